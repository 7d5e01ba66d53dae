# Release build and install. `make release` builds a binary that needs no Swift runtime on the
# target host (the Swift standard library is linked in statically; no Foundation is used).
PREFIX ?= /usr/local
SYSCONFDIR ?= /etc
UNITDIR ?= /lib/systemd/system
DESTDIR ?=
SCRATCH := .build-static
BIN := $(SCRATCH)/release/ballast

.PHONY: release install uninstall test demo bench

release:
	swift build -c release --static-swift-stdlib --scratch-path $(SCRATCH) --product ballast

install: release
	install -D -m 0755 $(BIN) $(DESTDIR)$(PREFIX)/bin/ballast
	install -D -m 0644 examples/demo.yaml $(DESTDIR)$(SYSCONFDIR)/ballast/ballast.yaml.example
	install -D -m 0644 dist/ballast.service $(DESTDIR)$(UNITDIR)/ballast.service

uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/ballast $(DESTDIR)$(UNITDIR)/ballast.service $(DESTDIR)$(SYSCONFDIR)/ballast/ballast.yaml.example

test:
	bash scripts/test.sh

demo:
	bash scripts/demo.sh

bench:
	bash Benchmarks/run.sh
