"""A new service written by docs/design.md's "Adding a service" guide, and the scenario
that checks what the guide says comes for free (tests/test_adding_a_service.py).

Its modules import devops_hub.v1.reports_pb2, which exists only in the stubs that test
generates into a temporary folder: they run in a process of their own
(`python -m tests.support.new_service`), never in the test process, whose default
descriptor pool must not gain a service the rest of the suite does not know.
"""
