# Makefile for mdd, a radiotherapy image and data archive inside PostgreSQL.
#
#   make            build the extension
#   make install    install it into the PostgreSQL found by pg_config
#   make demo       install dependencies, build, start a private cluster, load a sample patient
#   make test       install dependencies, build, run every test on private clusters
#   make fuzz       run the parser fuzzer (FUZZ_SECONDS, default 60)

EXTENSION = mdd
EXTVERSION = 0.2.0

MODULE_big = mdd
OBJS = extension/mdd.o extension/parse.o extension/paths.o \
	extension/file_io.o extension/storage_file.o extension/tally.o \
	extension/storage_remote.o extension/remote_transfer.o extension/remote_undo.o extension/compress.o \
	extension/dicom_parse.o extension/dicom_json.o extension/dicom_net.o extension/dicom_common.o extension/dicom_stream.o extension/dicom_pdu_check.o extension/dicom_scu.o extension/dicom_retrieve.o extension/dicom_send.o extension/dicom_find.o extension/dicom_fetch.o extension/dicom_commit.o extension/dicom_service.o extension/dicom_tls.o extension/tls.o \
	extension/dicom_rt.o extension/dicom_web.o extension/dvh.o \
	extension/network.o extension/send.o extension/commit.o extension/find.o extension/job_wake.o \
	extension/shmem.o extension/rule_select.o extension/cron.o extension/throttle.o \
	bgworker/worker_common.o bgworker/listen_socket.o bgworker/launcher.o \
	bgworker/listener.o bgworker/runner.o bgworker/fetch_step.o bgworker/scheduler.o bgworker/find_worker.o \
	bgworker/http_socket.o bgworker/http_worker.o bgworker/http_request.o bgworker/http_reply.o \
	bgworker/http_auth.o bgworker/http_routes.o bgworker/http_static.o bgworker/http_api.o bgworker/dicomweb.o bgworker/dicomweb_wado.o bgworker/dicomweb_stow.o

# the install script is assembled from sql/, in this order
SQL_PARTS = sql/schema.sql sql/storage.sql sql/audit.sql sql/ingest.sql \
	sql/read.sql sql/views.sql sql/nodes.sql sql/find.sql sql/spanning.sql sql/retrieve.sql \
	sql/jobs.sql sql/lifecycle.sql sql/fixity.sql sql/send.sql sql/commitment.sql sql/fetch.sql sql/span_wire.sql sql/rules.sql sql/retention.sql sql/dvh.sql sql/backup.sql sql/http.sql sql/web_api.sql sql/dicomweb.sql sql/roles.sql
DATA_built = $(EXTENSION)--$(EXTVERSION).sql
EXTRA_CLEAN = $(EXTENSION)--$(EXTVERSION).sql $(EXTENSION).control

DCMTK_LIBS = -ldcmtls -ldcmnet -ldcmdata -loflog -lofstd -lssl -lcrypto
SHLIB_LINK = $(DCMTK_LIBS) -lstdc++
# the http and s3 storages (libcurl) and zstd compression of blobs
SHLIB_LINK += -lcurl -lzstd
# the HTTP service (libmicrohttpd, with GnuTLS for HTTPS)
SHLIB_LINK += -lmicrohttpd
PG_CFLAGS = -Wall -Wextra -Werror -Wno-unused-parameter -Wno-missing-field-initializers \
	-Wno-sign-compare -Wno-cast-function-type

PG_CONFIG ?= pg_config
PGXS := $(shell $(PG_CONFIG) --pgxs)

# no LLVM bitcode: the C++ side is not meant for JIT inlining
override with_llvm = no

# released versions, frozen as they were installed, and the upgrade from them
# (docs/admin.md, "Upgrades"): a hand-written part for the tables, then what
# scripts/upgrade_part.py finds new or changed in SQL_PARTS
DATA = sql/$(EXTENSION)--0.1.0.sql
DATA_built += $(EXTENSION)--0.1.0--0.2.0.sql
EXTRA_CLEAN += $(EXTENSION)--0.1.0--0.2.0.sql
# the library knows its version: the launcher starts workers only on it
PG_CPPFLAGS += -DMDD_EXTVERSION='"$(EXTVERSION)"'

include $(PGXS)

# The C++ files of the DCMTK boundary are compiled without PostgreSQL's
# include directories, so that including a PostgreSQL header there fails.
MDD_CXXFLAGS = -std=c++17 -O2 -g -fPIC -Wall -Wextra -Werror -fvisibility=hidden
extension/dicom_%.o: extension/dicom_%.cpp extension/dicom.h $(wildcard extension/dicom_*.hpp)
	$(CXX) $(MDD_CXXFLAGS) -c -o $@ $<

$(EXTENSION)--$(EXTVERSION).sql: $(SQL_PARTS)
	cat $^ > $@

$(EXTENSION)--0.1.0--0.2.0.sql: sql/upgrade/0.1.0--0.2.0.sql sql/$(EXTENSION)--0.1.0.sql scripts/upgrade_part.py $(SQL_PARTS)
	{ cat sql/upgrade/0.1.0--0.2.0.sql && python3 scripts/upgrade_part.py --old sql/$(EXTENSION)--0.1.0.sql \
		--handwritten sql/upgrade/0.1.0--0.2.0.sql -- $(SQL_PARTS); } > $@.tmp || { rm -f $@.tmp; exit 1; }
	mv $@.tmp $@

bgworker/launcher.o: Makefile

$(EXTENSION).control: $(EXTENSION).control.in Makefile
	sed 's/@EXTVERSION@/$(EXTVERSION)/' $< > $@

all: $(EXTENSION).control

# the web viewer's static files, served by the HTTP workers from
# $(pg_config --sharedir)/mdd/web
install: install-web
.PHONY: install-web
install-web:
	rm -rf '$(DESTDIR)$(datadir)/mdd/web'
	$(MKDIR_P) '$(DESTDIR)$(datadir)/mdd'
	cp -R web '$(DESTDIR)$(datadir)/mdd/web'
	chmod -R a+rX '$(DESTDIR)$(datadir)/mdd/web'
uninstall: uninstall-web
.PHONY: uninstall-web
uninstall-web:
	rm -rf '$(DESTDIR)$(datadir)/mdd'

.PHONY: demo test fuzz deps
deps:
	scripts/install-deps.sh

demo: deps
	scripts/demo.sh

test: deps
	test/run

fuzz:
	$(MAKE) -C fuzz run FUZZ_SECONDS=$(or $(FUZZ_SECONDS),60)
