"""rate-limit: the policy (policy.py), its compiled admission (admission.pyx), shared-memory token buckets
(bucket.pyx) and the local and Redis backends."""
