"""dflow's OpenAI-compatible HTTP gateway (``dflow serve``).

The gateway is a Dask client of a dflow cluster: it validates and submits
requests with dflow's client API and holds no model. Video jobs and
downloadable results live in the cluster (published futures, job records in
the scheduler's metadata), so any number of gateways serve the same jobs and a
restarted gateway loses none.

Modules: ``app`` (the app factory), ``routes``, ``params`` (OpenAI bodies to
dflow requests), ``errors`` (the OpenAI error envelope), ``auth`` (API keys),
``jobs`` (the cluster-held job store), ``media`` (image and MP4 encoding, run on
workers), ``server`` (uvicorn). This package imports none of them, so workers
import ``media`` without the web stack.
"""
