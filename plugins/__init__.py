"""dflow's scheduler side: :func:`dflow.plugins.install.install` puts it on a
scheduler."""
