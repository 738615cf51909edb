#!/usr/bin/env bash
# Make dflow importable on a GPU machine without network (the device tool's machine):
# install the wheels of the given folders into a site folder and lay this checkout out
# there as the installed package (dflow.plugins, dflow.dashboards, dflow.configs and
# the dask.sizeof entry point), as `pip install .` would. Prints the PYTHONPATH to use.
#
#   bash benchmarks/gpu_site.sh .whl1 .whl2 && export PYTHONPATH=/tmp/site
#
# Run it again with another folder to add wheels (the device's 64 MiB carry cap may
# split them over calls). Import from outside the checkout: ./dflow would shadow it.
set -euo pipefail
site=${SITE:-/tmp/site}
top=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$site"
for folder in "$@"; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$site" "$folder"/*.whl
done
rm -rf "$site/dflow" "$site"/dflow-*.dist-info
mkdir -p "$site/dflow" "$site/dflow-0.1.0.dist-info"
for entry in "$top"/dflow/*; do
    ln -s "$entry" "$site/dflow/"
done
for folder in plugins dashboards configs; do
    ln -s "$top/$folder" "$site/dflow/$folder"
done
printf 'Metadata-Version: 2.1\nName: dflow\nVersion: 0.1.0\n' \
    > "$site/dflow-0.1.0.dist-info/METADATA"
cat > "$site/dflow-0.1.0.dist-info/entry_points.txt" <<'EOF'
[dask.sizeof]
torch = dflow.protocol:register_sizeof

[dask_cli]
dflow = dflow.cli:dflow
EOF
echo "PYTHONPATH=$site"
