#!/usr/bin/env bash
# GPU checks of the ISM engine in one table, in at most 8 minutes on one GPU (9 with --compile):
#   1. the GPU tests (pytest -m gpu: fused ISM on cuda against brute force on the CPU, the batch sized
#      from free memory, each precision's error, `deepmr predict` on cuda);
#   2. ISM mutants/s at each precision, ours (fused ensemble, the default) against tangermeme on the
#      same device (its default call, and its fastISM steady state), for BPNet 64x8 at 1 kb and a
#      ChromBPNet-sized BPNet (512 filters, 8 dilated layers, 2,114 bp in, 1 kb out); with --compile,
#      for BPNet also full recomputation eager and through torch.compile (bench_ism.py --compile:
#      rows (h), (h') in steady state, its first run with compiling in the note; 60 s more);
#   3. the change of the quickstart pipeline's global CE at each precision against fp32 (bench_ism.py
#      --global-ce: ISM, effects, mr, meta through the embedded cluster), beside the ISM's max |error|;
#   4. the wall time of `deepmr predict` of 2,000 loci x 5 BPNet 64x8 members (1 kb, counts head)
#      through the embedded cluster (one worker per GPU, two threads: a write overlaps the next chunk).
# Usage: benchmarks/gpu_check.sh [--smoke] [--compile]
#   --smoke: tiny sizes, on the GPU if there is one and else on the CPU (fp32 and bf16 only), in a minute or two.
#   --compile: add the torch.compile rows (step 2, BPNet).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0 COMPILE=()
for arg in "$@"; do
    case "$arg" in
        --smoke) SMOKE=1 ;;
        --compile) COMPILE=(--compile) ;;
        *) echo "gpu_check.sh: unknown option $arg (usage: gpu_check.sh [--smoke] [--compile])" >&2; exit 2 ;;
    esac
done
CUDA=$(python -c 'import torch; print(int(torch.cuda.is_available()))')
if ((!SMOKE && !CUDA)); then
    echo "gpu_check.sh: no CUDA GPU here; run with --smoke for the CPU smoke test" >&2
    exit 2
fi
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
if ((CUDA)); then DEVICE=cuda; PRECISIONS="fp32 tf32 bf16 fp16"; else DEVICE=cpu; PRECISIONS="fp32 bf16"; fi
if ((SMOKE)); then
    BPNET=(--bpnet-loci 1 --bpnet-members 2 --bpnet-length 60 --bpnet-filters 8 --bpnet-layers 2 --bpnet-batch 128)
    CHROM=(--chrom-loci 1 --chrom-members 2 --chrom-length 80 --chrom-filters 8 --chrom-layers 3 --chrom-trimming 10 --chrom-batch 128)
    CE=(--ce-train 300 --ce-epochs 2)
    LOCI=20 MEMBERS=2 LENGTH=60 FILTERS=8 LAYERS=2 CHUNK=10
    T_TESTS=300 T_BPNET=120 T_CHROM=120 T_CE=180 T_PREDICT=180
else
    BPNET=(--bpnet-loci 8 --bpnet-members 5 --bpnet-length 1000 --bpnet-filters 64 --bpnet-layers 8 --bpnet-batch 2048)
    CHROM=(--chrom-loci 1 --chrom-members 2 --chrom-length 2114 --chrom-filters 512 --chrom-layers 8 --chrom-trimming 557 --chrom-batch 256)
    CE=(--ce-train 1000 --ce-epochs 5)
    LOCI=2000 MEMBERS=5 LENGTH=1000 FILTERS=64 LAYERS=8 CHUNK=64
    T_TESTS=45 T_BPNET=$((${#COMPILE[@]} ? 150 : 90)) T_CHROM=100 T_CE=60 T_PREDICT=180
fi

echo "== 1/4 GPU tests (pytest -m gpu, at most ${T_TESTS} s)" >&2
timeout "$T_TESTS" python -m pytest -q -m gpu tests/ -p no:cacheprovider >"$OUT/tests.log" 2>&1
echo "$?" >"$OUT/tests.rc"
tail -3 "$OUT/tests.log" >&2

for model in bpnet chrombpnet; do
    if [[ $model == bpnet ]]; then SIZES=("${BPNET[@]}" "${COMPILE[@]}"); LIMIT=$T_BPNET; else SIZES=("${CHROM[@]}"); LIMIT=$T_CHROM; fi
    echo "== 2/4 ISM throughput, $model (at most ${LIMIT} s)" >&2
    # shellcheck disable=SC2086 # PRECISIONS is a list of words
    timeout "$LIMIT" python benchmarks/bench_ism.py --models "$model" --device "$DEVICE" --threads "$(nproc)" \
        --precisions $PRECISIONS --peers steady --bpnet-repeats 1 "${SIZES[@]}" --tsv "$OUT/$model.tsv" \
        >"$OUT/$model.log" 2>&1
    echo "$?" >"$OUT/$model.rc"
    tail -4 "$OUT/$model.log" >&2
done

echo "== 3/4 global CE per precision, the quickstart pipeline (at most ${T_CE} s)" >&2
# shellcheck disable=SC2086 # PRECISIONS is a list of words
timeout "$T_CE" python benchmarks/bench_ism.py --models --global-ce --precisions $PRECISIONS "${CE[@]}" \
    --tsv "$OUT/ce.tsv" >"$OUT/ce.log" 2>&1
echo "$?" >"$OUT/ce.rc"
tail -4 "$OUT/ce.log" >&2

echo "== 4/4 deepmr predict, $LOCI loci x $MEMBERS members (at most ${T_PREDICT} s)" >&2
mkdir -p "$OUT/py"
cat >"$OUT/py/gpu_check_models.py" <<PY
from deepmr_dist.models.bpnet import bpnet_ensemble


def members():
    """$MEMBERS BPNet ${FILTERS}x${LAYERS} members of one task, as in the issue's 2,000-locus job."""
    return bpnet_ensemble($MEMBERS, 0, tasks=("TF",), n_filters=$FILTERS, n_layers=$LAYERS)
PY
python - "$OUT/loci.fa" "$LOCI" "$LENGTH" <<'PY'
import sys
import numpy as np
path, n, length = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = np.random.default_rng(0)
with open(path, "w") as f:
    for i in range(n):
        f.write(f">locus{i:05d}\n{''.join(rng.choice(list('ACGT'), length))}\n")
PY
START=$(date +%s.%N)
PYTHONPATH="$OUT/py${PYTHONPATH:+:$PYTHONPATH}" timeout "$T_PREDICT" deepmr predict --model gpu_check_models:members \
    --fasta "$OUT/loci.fa" --store "$OUT/run.zarr" --output-index 1 --chunk-loci "$CHUNK" -q >"$OUT/predict.log" 2>&1
echo "$?" >"$OUT/predict.rc"
echo "$START $(date +%s.%N)" >"$OUT/predict.time"
tail -2 "$OUT/predict.log" >&2

python - "$OUT" "$SMOKE" "$DEVICE" "$LOCI" "$MEMBERS" <<'PY'
import csv, re, sys
from pathlib import Path

out, smoke, device, loci, members = Path(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4], sys.argv[5]
rows = [("check", "model", "precision", "ours /s", "tangermeme /s", "vs (c)", "vs (c')", "max|err| vs fp32", "note")]
rc = out.joinpath("tests.rc").read_text().strip()
summary = next((l for l in reversed(out.joinpath("tests.log").read_text().splitlines()) if re.search(r"passed|failed|skipped|error", l)), "no summary")
rows.append(("pytest -m gpu", "", "", "", "", "", "", "", f"rc {rc}: {summary.strip('= ')}"))
for model in ("bpnet", "chrombpnet"):
    path = out / f"{model}.tsv"
    rc = out.joinpath(f"{model}.rc").read_text().strip()
    table = list(csv.DictReader(path.open(), delimiter="\t")) if path.exists() else []
    if not table:
        rows.append(("ISM throughput", model, "", "", "", "", "", "", f"rc {rc}: no rows (timed out or failed)"))
    by = {r["method"]: r for r in table}
    for r in table:
        if r["method"].startswith("(h"):
            rows.append(("ISM full recompute", r["model"].split(" (")[0], r["precision"], f"{float(r['mutants_per_s']):,.0f}",
                         "", "", "", "", f"{r['method'][:4].strip()} {r['note'] or 'eager'}; {r['processor']}, {r['device']}"))
        if not r["method"].startswith("(f)"):
            continue
        peer = by.get(f"(c) tangermeme, {r['precision']}")
        rows.append(("ISM throughput", r["model"].split(" (")[0], r["precision"], f"{float(r['mutants_per_s']):,.0f}",
                     f"{float(peer['mutants_per_s']):,.0f}" if peer else "failed", f"{float(r['vs_c']):.2f}x",
                     f"{float(r['vs_c_steady']):.2f}x", r["max_abs_err_vs_fp32"], f"{r['processor']}, {r['device']}"))
rc = out.joinpath("ce.rc").read_text().strip()
table = list(csv.DictReader(out.joinpath("ce.tsv").open(), delimiter="\t")) if out.joinpath("ce.tsv").exists() else []
if not table:
    rows.append(("global CE", "quickstart", "", "", "", "", "", "", f"rc {rc}: no rows (timed out or failed)"))
for r in table:
    rows.append(("global CE", r["method"][4:], r["precision"], "", "", "", "", r["max_abs_err_vs_fp32"],
                 f"CE {r['global_ce']}, |change| vs fp32 {r['abs_change_global_ce_vs_fp32']}; {r['processor']}, {r['device']}"))
rc = out.joinpath("predict.rc").read_text().strip()
start, stop = map(float, out.joinpath("predict.time").read_text().split())
line = next((l for l in out.joinpath("predict.log").read_text().splitlines() if "mutant predictions" in l), "")
rate = re.search(r"\(([\d,]+)/s\)", line)
log = out.joinpath("predict.log").read_text().strip().splitlines()
note = {"0": "", "124": " (timed out)"}.get(rc, f" (failed: {log[-1][:100] if log else 'no output'})")
rows.append(("deepmr predict", f"{loci} loci x {members} BPNet", "fp32", rate.group(1) if rate else "", "", "", "", "",
             f"rc {rc}, {stop - start:.1f} s wall{note}"))
widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
print(f"\ngpu_check.sh{' --smoke' if smoke else ''} on {device}")
for r in rows:
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
PY
