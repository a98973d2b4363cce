# cython: language_level=3
"""The phase runner: calls the policies' hooks of each phase with one error policy for all of them.

- A hook that refuses (raises Reject, a GatewayError) refuses the request: the refusal is counted once, as a
  rejection with bounded labels (consumer, model as configured, the error's reason), by accounting.
- A hook that answers (raises Reply, in the access or request phase) answers the request itself, with no
  upstream: a cache hit or a guardrail's canned answer.
- A hook that raises anything else has a bug: it is logged with the phase and the policy's name, and the
  request is answered 500 `policy_error` (never reported as an upstream failure).
- complete and log hooks cannot change the answer (it is out): their errors are logged only.

The tuples of hooks are built once per config (fastgw.policies.pipeline): an unused phase is an empty loop.
"""
from fastgw.errors import GatewayError, PolicyError, Reply
from fastgw.policies.loader import model_label


cdef object run_access(Gateway gw, Exchange ex):
    """Run the access hooks; raises GatewayError (refusal or policy bug) or Reply."""
    cdef tuple hooks = gw.access_hooks
    cdef Py_ssize_t i = 0
    try:                                # one try around the loop, not one per hook: this runs per request
        for i in range(len(hooks)):
            hooks[i](ex)
    except (GatewayError, Reply):
        raise
    except Exception:
        raise _bug(gw, ex, hooks[i], "access")
    return None


cdef object run_request(Gateway gw, Exchange ex):
    """Run the request hooks; None when all ran, else a coroutine that runs the rest after the first awaitable
    (a hook waiting on I/O) and raises as run_access does."""
    cdef tuple hooks = gw.request_hooks
    cdef Py_ssize_t i = 0
    try:
        for i in range(len(hooks)):
            pending = hooks[i](ex)
            if pending is not None:
                return _request_rest(gw, ex, hooks[i], pending, hooks[i + 1:])
    except (GatewayError, Reply):
        raise
    except Exception:
        raise _bug(gw, ex, hooks[i], "request")
    return None


async def _request_rest(Gateway gw, Exchange ex, hook, pending, tuple rest):
    try:
        await pending
    except (GatewayError, Reply):
        raise
    except Exception:
        raise _bug(gw, ex, hook, "request")
    for hook in rest:
        pending = _call1(gw, ex, hook, "request")
        if pending is not None:
            try:
                await pending
            except (GatewayError, Reply):
                raise
            except Exception:
                raise _bug(gw, ex, hook, "request")


cdef void run_response_headers(Gateway gw, Exchange ex) except *:
    for hook in gw.response_hooks:
        _call1(gw, ex, hook, "response_headers")


cdef void run_stream_event(Gateway gw, Exchange ex, bytes event) except *:
    for hook in gw.stream_event_hooks:
        try:
            hook(ex, event)
        except GatewayError:
            raise
        except Exception:
            raise _bug(gw, ex, hook, "stream_event")


cdef void run_complete(Gateway gw, Exchange ex) except *:
    for hook in gw.complete_hooks:
        try:
            pending = hook(ex)
            if pending is not None:
                gw.loop.create_task(_background(gw, ex, hook, pending))
        except Exception:
            _log_bug(gw, ex, hook, "complete")


async def _background(Gateway gw, Exchange ex, hook, pending):
    try:
        await pending
    except Exception:
        _log_bug(gw, ex, hook, "complete")


cdef inline object _call1(Gateway gw, Exchange ex, hook, str phase):
    try:
        return hook(ex)
    except (GatewayError, Reply):
        raise
    except Exception:
        raise _bug(gw, ex, hook, phase)


cdef object _bug(Gateway gw, Exchange ex, hook, str phase):
    return PolicyError(phase, _log_bug(gw, ex, hook, phase))


cdef str _log_bug(Gateway gw, Exchange ex, hook, str phase):
    policy = getattr(getattr(hook, "__self__", None), "name", None) or getattr(hook, "__qualname__", repr(hook))
    gw.log.exception("policy failed", phase=phase, policy=policy, request_id=ex.request_id)
    return policy


cdef void refused(Gateway gw, Exchange ex, object err) except *:
    """Note a policy's refusal (raised out of the access or request phase) for accounting, with bounded
    labels: the model as configured (else "other"), the refusal's reason. A policy's bug is no rejection."""
    if not isinstance(err, PolicyError):
        ex.rejection = (ex.consumer, model_label(gw.policy_ctx, ex.model) if ex.model else "", err.reason)
