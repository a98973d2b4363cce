"""Policies: the API custom policies are written against (api.py), the loader of policy files (loader.py),
the per-phase hook tuples (pipeline.py), and the built-in policies, each in a subpackage with its compiled twin.

Custom policies import what they need from here:

    from fastgw.policies import Policy, Reject
"""
from fastgw.policies.api import PHASES, Policy, PolicyContext, Reject, Reply
from fastgw.policies.loader import (BUILTINS, FieldError, completion_estimate, load_policies, load_policy_file,
                                    model_label, resolve)

__all__ = ["PHASES", "Policy", "PolicyContext", "Reject", "Reply", "BUILTINS", "FieldError", "completion_estimate",
           "load_policies", "load_policy_file", "model_label", "resolve"]
