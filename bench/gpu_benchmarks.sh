#!/bin/sh
# gpu_benchmarks.sh OUT - the GPU figures of docs/performance.md in one run on a machine with an
# NVIDIA GPU: (a) matvec bandwidth, (b) qwen3.6-35b-a3b with every expert in GPU memory, (c) the
# same with a GPU cache of 25% of the experts, and qwen3.5-397b-a17b cut to the layers the disk
# holds, (d) the qwen3-30b-a3b shape cut to 8 layers, for the llama.cpp comparison. Writes one
# JSON (or text) file per figure under OUT. Needs `make` (with nvcc) and `make bench` done first.
# Not a test: it prints figures and asserts nothing.
set -u
OUT=${1:?usage: gpu_benchmarks.sh OUT [PARTS]   (PARTS: any of "a b d c397"; default all)}
PARTS=${2:-a b d c397}
want() { case " $PARTS " in *" $1 "*) return 0 ;; esac; return 1; }
MF=build/moeflux
W=${WORK:-/tmp/mf-bench}
mkdir -p "$OUT" "$W"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1

# (a) q4 / q8 / bf16 matvec at real shapes against the device copy bandwidth
want a && [ -x build/bench_cuda_matvec ] && build/bench_cuda_matvec > "$OUT/a_matvec.txt" 2> "$OUT/a_matvec.err"

# (b), (c) 35B-A3B: all 40 layers, 18 GB of q4 experts
if want b; then
$MF synth qwen3.6-35b-a3b "$W/q36.moeflux" --quiet --skew 1 --seed 1
$MF bench "$W/q36.moeflux" --cuda --gpu-cache-gb 40 --prompt-tokens 512 --gen-tokens 64 --json \
    > "$OUT/b_q36_all_cached.json" 2> "$OUT/b_q36.err"
EXPERTS=$($MF info "$W/q36.moeflux" --json | sed 's/.*"experts_bytes":\([0-9.e+]*\).*/\1/')
QUARTER=$(awk -v e="$EXPERTS" 'BEGIN { printf "%.3f", e / 4 / 1e9 }')
cat "$W/q36.moeflux" > /dev/null # the file in the page cache: RAM, not the disk, feeds the host tier
$MF bench "$W/q36.moeflux" --cuda --gpu-cache-gb "$QUARTER" --prompt-tokens 128 --warmup-tokens 128 --gen-tokens 128 --json \
    > "$OUT/c_q36_quarter_cached.json" 2> "$OUT/c_q36.err"
# the same with every miss uploaded into the GPU cache first instead of read from host RAM in place
$MF bench "$W/q36.moeflux" --cuda --gpu-cache-gb "$QUARTER" --prompt-tokens 128 --warmup-tokens 128 --gen-tokens 128 --json \
    --no-host-reads > "$OUT/c_q36_quarter_cached_no_host_reads.json" 2>> "$OUT/c_q36.err"
rm -f "$W/q36.moeflux"
fi

# (d) qwen3-30b-a3b cut to 8 layers (llama.cpp: 1,295 tok/s decode, 44,753 tok/s prefill of 512
# tokens all on the GPU; 184 tok/s with the experts on the CPU)
if want d; then
$MF synth qwen3-30b-a3b "$W/q30.moeflux" --layers 8 --quiet --skew 1 --seed 1
$MF bench "$W/q30.moeflux" --cuda --gpu-cache-gb 20 --prompt-tokens 512 --gen-tokens 128 --json \
    > "$OUT/d_q30_all_cached.json" 2> "$OUT/d_q30.err"
EXPERTS=$($MF info "$W/q30.moeflux" --json | sed 's/.*"experts_bytes":\([0-9.e+]*\).*/\1/')
QUARTER=$(awk -v e="$EXPERTS" 'BEGIN { printf "%.3f", e / 4 / 1e9 }')
cat "$W/q30.moeflux" > /dev/null
$MF bench "$W/q30.moeflux" --cuda --gpu-cache-gb "$QUARTER" --prompt-tokens 128 --warmup-tokens 256 --gen-tokens 128 --json \
    > "$OUT/d_q30_quarter_cached.json" 2>> "$OUT/d_q30.err"
$MF bench "$W/q30.moeflux" --cuda --gpu-cache-gb "$QUARTER" --prompt-tokens 128 --warmup-tokens 256 --gen-tokens 128 --json \
    --no-host-reads > "$OUT/d_q30_quarter_cached_no_host_reads.json" 2>> "$OUT/d_q30.err"
rm -f "$W/q30.moeflux"
fi

# (c) 397B-A17B: as many layers as the disk holds (3.6 GB of experts a layer)
if want c397; then
FREE=$(df -B1 --output=avail "$W" | tail -1)
LAYERS=$(awk -v f="$FREE" 'BEGIN { n = int((f - 8e9) / 3.75e9); if (n > 60) n = 60; if (n < 1) n = 1; print n }')
$MF synth qwen3.5-397b-a17b "$W/q397.moeflux" --layers "$LAYERS" --quiet --skew 1 --seed 1
$MF bench "$W/q397.moeflux" --cuda --gpu-cache-gb 20 --prompt-tokens 64 --gen-tokens 32 --json \
    > "$OUT/c_q397_${LAYERS}layers.json" 2> "$OUT/c_q397.err"
rm -f "$W/q397.moeflux"
fi
ls -la "$OUT"
