"""Run modes and stage functions the tests start in processes of their own; nothing here
is imported by the library.

    echo_mode.py       a run mode that writes one file (the entry point, cheaply)
    processes_mode.py  a run mode that joins the JAX job and records what each process sees
    stage_probe.py     stage functions for the tests of `demo/apart.py`
"""
