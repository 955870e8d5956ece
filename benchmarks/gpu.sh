#!/usr/bin/env bash
# Issue 16's GPU run, prepared to fit one short call on a machine with a GPU:
#
#     bash benchmarks/wheels.sh                          # here, once: the peers' wheels
#     bash benchmarks/gpu.sh                             # there (carry .whl; about 8 min)
#     bash benchmarks/gpu.sh jobs:300 choices:200        # rerun what ran out of time
#
# With this workplace's device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"],
# timeout_s=540); its files come back from $OUT.
#
# The device tests first (correctness on CUDA before any timing), then each benchmark
# section under its own time limit (seconds after the colon), printing each model's table
# as soon as it is measured, so a section cut short keeps what it finished. Everything
# lands in $OUT (else /tmp/hvpfunc-gpu): gpu.txt (the machine, torch, each section's exit
# status), tests.txt, one SECTION.md each, errors.txt. DEVICE=cpu SIZE=tiny rehearse it
# on a machine without a GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-/tmp/hvpfunc-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
} > "$out/gpu.txt" 2>&1
sections=("$@")
[ ${#sections[@]} -gt 0 ] || sections=(tests:60 products:90 jobs:180 choices:120 solvers:30)
for section in "${sections[@]}"; do
    name=${section%%:*}
    limit=${section##*:}
    began=$SECONDS
    if [ "$name" = tests ]; then
        timeout "$limit" python3 -m pytest -q -p no:cacheprovider tests/test_devices.py > "$out/tests.txt" 2>&1
    else
        timeout "$limit" python3 -m benchmarks --device "${DEVICE:-cuda}" ${SIZE:+--size "$SIZE"} --only "$name" \
            > "$out/$name.md" 2>> "$out/errors.txt"
    fi
    echo "$name: exit $? after $((SECONDS - began)) s (limit $limit)" >> "$out/gpu.txt"
done
cat "$out/gpu.txt"
