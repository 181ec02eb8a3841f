#!/usr/bin/env bash
# The README's quickstart, run as a newcomer runs it: a fresh clone, an empty pip cache, then make run,
# make serve, a curl to /v1/predict, dvc metrics/plots, the model card and intentops predict.
#
#   benchmarks/quickstart.sh DEST [MIRROR]
#
# DEST: where to clone this repository (must not exist). MIRROR: a dataset mirror (INTENTOPS_DATA_MIRROR) for
# machines that cannot reach the public URLs. The transcript (each command and the first lines of its output)
# goes to DEST.transcript; the last line on stdout is JSON: seconds for the install, the pipeline, the server's
# start, and from the clone to the first curl answer.
set -euo pipefail
dest=$1
mirror=${2:-}
src=$(cd "$(dirname "$0")/.." && pwd)
transcript="$dest.transcript"
: >"$transcript"
pip_cache=$(mktemp -d)
export PIP_CACHE_DIR=$pip_cache WANDB_MODE=offline
[[ -n $mirror ]] && export INTENTOPS_DATA_MIRROR=$mirror

# step "COMMAND" [LINES]: run COMMAND in DEST, keep its full output in DEST.logs/, the first LINES in the transcript.
step() {
  local n=${2:-12} log
  log="$dest.logs/$(date +%s%N).log"
  mkdir -p "$dest.logs"
  echo "\$ $1" >>"$transcript"
  (cd "$dest" && bash -c "$1") >"$log" 2>&1
  head -n "$n" "$log" | cut -c1-400 >>"$transcript"
  [[ $(wc -l <"$log") -gt $n ]] && echo "[… $(($(wc -l <"$log") - n)) more lines]" >>"$transcript"
  echo >>"$transcript"
}

t0=$SECONDS
git clone -q "$src" "$dest"
step "make venv" 5
t_install=$((SECONDS - t0))
step "make run 2>&1 | tail -n 4" 4
t_pipeline=$((SECONDS - t0 - t_install))

(cd "$dest" && setsid make serve >"$dest.serve.log" 2>&1 & echo $! >"$dest.serve.pid")
t_serve0=$SECONDS
body='{"text": "I still have not received my new card, it has been two weeks"}'
until curl -sf -o /dev/null -X POST http://127.0.0.1:8000/v1/predict -H 'content-type: application/json' -d "$body"; do
  ((SECONDS - t_serve0 < 300)) || { echo "no answer within 300 s" >&2; tail -n 30 "$dest.serve.log" >&2; exit 1; }
  sleep 1
done
t_first=$((SECONDS - t0))
t_serve=$((SECONDS - t_serve0))
echo "\$ make serve   # in a second terminal" >>"$transcript"
grep -m 3 -E "Application|Deployed|ready" "$dest.serve.log" | cut -c1-300 >>"$transcript" || true
echo >>"$transcript"

step "curl -s -X POST http://127.0.0.1:8000/v1/predict -H 'content-type: application/json' -d '$body' | python3 -m json.tool" 40
step "curl -s http://127.0.0.1:8000/v1/model/card | head -n 20" 20
step ".venv/bin/dvc metrics show reports/eval/metrics.json" 4
step ".venv/bin/dvc plots show" 3
step "ls reports/validation/data_docs/index.html" 2
step "head -n 30 models/bundle/model_card.md" 30
if [[ -n $mirror && -f $mirror/banking77/test.csv ]]; then
  step ".venv/bin/intentops predict $mirror/banking77/test.csv -o predicted.csv && head -n 3 predicted.csv" 6
fi
step ".venv/bin/intentops --version" 2

kill -TERM -- "-$(cat "$dest.serve.pid")" 2>/dev/null || true
sleep 5
(cd "$dest" && .venv/bin/ray stop --force >/dev/null 2>&1) || true
rm -rf "$pip_cache"
printf '{"install_s": %d, "pipeline_s": %d, "serve_start_s": %d, "clone_to_first_answer_s": %d, "cores": %d, "transcript": "%s"}\n' \
  "$t_install" "$t_pipeline" "$t_serve" "$t_first" "$(nproc)" "$transcript"
