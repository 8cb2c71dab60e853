# `make demo` and `make test` set everything up on first use (see setup.sh), then run.
PROMPT ?= How can entropy be reversed?

.venv/.ready: setup.sh requirements.txt requirements-dev.txt
	./setup.sh
	touch $@

demo: .venv/.ready  ## train a toy transformer and show that it learned
	.venv/bin/python transformer.py -v

shakespeare: .venv/.ready  ## a character-level model of tinyshakespeare
	.venv/bin/python transformer.py --task shakespeare -v

gpt: .venv/.ready  ## GPT-2 124M continues PROMPT (downloads 548 MB of weights once)
	.venv/bin/python gpt.py -p "$(PROMPT)"

# the tests' kernel counts are pinned for the clang backend, so they run on it unless DEV says else
test: .venv/.ready  ## lint, then the test suite
	.venv/bin/ruff check .
	DEV=$(or $(DEV),CPU) .venv/bin/python -m pytest --durations=15

# GPT-2's and the lab's tests again on tinygrad alone: runtime.install() installs nothing
test-plain: .venv/.ready  ## the GPT-2 and lab tests with TINYGPT_PLAIN=1
	TINYGPT_PLAIN=1 DEV=$(or $(DEV),CPU) .venv/bin/python -m pytest --durations=10 $(PLAIN_TESTS)

PLAIN_TESTS = tests/test_gpt.py tests/test_heads.py tests/test_causes.py tests/test_hooks.py \
	tests/test_kernels.py tests/test_families.py tests/test_runtime.py tests/test_patching.py \
	tests/test_serve.py

.PHONY: demo shakespeare gpt test test-plain
