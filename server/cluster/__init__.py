"""Facet on Ray Serve (issue 16, part 3): one ingress, N engine replicas with adapter affinity.

    python -m server.cluster --replicas 2 --port 8000       # make serve-cluster

``engine.FacetEngine`` (each replica one whole Facet app), ``ingress`` (routing by adapter
version through Ray Serve's model multiplexing), ``app.build_app`` / ``app.run`` (both bound to
one application). Design and measurements: docs/scale-out.md, "Ray Serve".
"""
