"""Planning a run without running it: learning-rate schedules as DeepSpeed defines them (lr.py),
the rounds of a schedule (plan.py), and their projected cost on a link (projection.py); used by
`qsr-ds plan` (qsr_ds/cli.py)."""
