"""The engine-free sync core: SyncCore (core.py) runs rounds through an averager (averager.py: exact,
compress.py + wire.py: bf16/int8 deltas), blocking or overlapped with training (overlap.py), after a
pre-check all replicas agree on (precheck.py); layout.py plans buckets, selection.py names the tensors,
checkpoint.py holds the QSR state of a checkpoint. Imports no engine."""
