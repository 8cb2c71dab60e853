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

.PHONY: demo shakespeare gpt test
