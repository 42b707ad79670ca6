"""Load benchmarks for otpgate (``make bench``); see ``docs/performance.md``.

Everything here talks to 127.0.0.1 only: the servers under test, the LabsMobile sink and the
load client all live on the loopback interface.
"""
