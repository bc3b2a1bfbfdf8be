"""The development stack: what `make run`, the tests and the bench start DevOps Hub
with, on one machine. Never deployed (deploy/ runs each part as its own container).

launcher   `make run`: every part as a supervised process, migrations, seeding
ports      free loopback ports, and waiting for one to answer
cluster    a hub of its own, part by part, with its own redis-server and PostgreSQL,
           each of which a fault run kills, freezes and starts again
coherence  the staleness checker that drives a cluster through faults
"""
