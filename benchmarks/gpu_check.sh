#!/usr/bin/env bash
# The GPU check of issue 13 item 6, as run on the device machine (one H200, its own jax 0.11.2
# with CUDA 13, no network). Prepare here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     ase==3.29.0 e3nn-jax==0.21.0 jax-md==0.2.29 jraph ml-collections frozendict
#   mkdir -p .whl/src && git archive HEAD fused_dynamics benchmarks tests | tar -x -C .whl/src
# then run `bash benchmarks/gpu_check.sh` there with .whl carried. Results land in $OUT; the
# committed copies are benchmarks/results/*gpu*.json (report.py renders them).
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 3
export PYTHONPATH=/tmp/site:$PWD/.whl/src PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
nvidia-smi -L | tee "$OUT/gpu.txt"
cd .whl/src
# physics and layouts on the GPU (the bitwise slot-independence case differs in the last bit)
timeout 110 python3 -m pytest -q -p no:cacheprovider tests/test_blocked.py 2>&1 | tail -4 \
  | tee "$OUT/tests_gpu.log"
timeout 230 python3 benchmarks/bench_peers.py --only fused_dynamics,jax_md --repeat 3 \
  --name peers_gpu_relax > "$OUT/bench_gpu.log" 2>&1
timeout 150 python3 benchmarks/bench_fused_overhead.py --rounds 5 --name fused_overhead_gpu \
  > "$OUT/overhead_gpu.log" 2>&1
if [ $SECONDS -lt 380 ]; then
  timeout $((540 - SECONDS)) python3 benchmarks/bench_peers.py --only fused_dynamics,jax_md \
    --repeat 3 --md-systems 256 --no-relax --name peers_gpu_large > "$OUT/bench_large.log" 2>&1
fi
cp benchmarks/results/*gpu*.json "$OUT/" 2>/dev/null
echo "total ${SECONDS}s"
