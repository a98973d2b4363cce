cpdef object request_key(bytes body, object fields, str endpoint, str model, str scope, bint allow_temperature,
                         frozenset no_tools)
