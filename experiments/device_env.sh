# Sourced from the repo root by the device_run.sh scripts on the GPU machine. The GPU image has no install of flux:
# `flux_kernels` (kernels/) and `flux.conf` (conf/) are exposed through symlinks, as the wheel maps them, and the
# wheels carried in .whl/ for what the image lacks (omegaconf, hydra-core, antlr4, gguf; see DESIGN.md) are
# installed into /tmp/site.
mkdir -p /tmp/flux_pkgs
ln -sfn "$PWD/kernels" /tmp/flux_pkgs/flux_kernels
[ -e flux/conf ] || ln -s ../conf flux/conf
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/flux_pkgs:$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
