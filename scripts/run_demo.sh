#!/usr/bin/env bash
# The main job: set-up, build, then the demo on every visible GPU through NCCL, or on 2 CPU
# processes through gloo where there is no GPU.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$TPEXT_ROOT"
tpext_build
ngpu=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
nproc=$(( ngpu > 0 ? ngpu : 2 ))
echo "[tpext] demo on $nproc $([ "$ngpu" -gt 0 ] && echo GPU || echo CPU) process(es)"
exec "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m tpext "$@"
