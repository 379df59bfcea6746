"""Serving at scale (lesson 06c): one engine under growing load (goodput, the knee, Little's law, admission),
replicas behind a real router (vllm-router), tensor parallelism (``labkit.serve.tensor_parallel``), and capacity
and cost.

load.py (the rate sweep and its arithmetic) · fleet.py (replicas and the router, started and stopped by pid) ·
plan.py (replicas and cost per million tokens from a measured record) · experiment.py (``labkit run scale``) ·
exercise.py (06c: goodput under an SLO) · figures.py
"""
