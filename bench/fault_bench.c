// SPDX-License-Identifier: GPL-2.0
/*
 * umem vs userfaultfd, the same server logic in the same language.
 *
 *   fault_bench roundtrip umem|uffd PAGES
 *       one faulting thread touches PAGES missing pages in order; one
 *       server thread reads each fault (blocking read) and fills that one
 *       page (UMEM_FILL / UFFDIO_COPY). Prints the per-fault latency
 *       percentiles in microseconds.
 *   fault_bench fill umem|uffd BYTES BATCH
 *       fills BYTES of never-touched memory in BATCH-byte calls with no
 *       faults (UMEM_FILL / UFFDIO_COPY). Prints MiB/s.
 *
 * Output is one JSON object per run on stdout.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "linux/umem.h"

#define PAGE 4096UL

struct target {
	int server_fd;		/* umem server fd or userfaultfd */
	int control;		/* umem: the control fd */
	struct umem_destroy name;	/* umem: the instance */
	int umem;		/* 1: umem, 0: userfaultfd */
	char *mem;		/* the faulting mapping */
	size_t size;
	char *source;		/* what pages are filled from */
};

static void die(const char *what)
{
	perror(what);
	exit(2);
}

static double now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void open_umem(struct target *t, size_t size)
{
	struct umem_api api = { .api = UMEM_API_VERSION };
	struct umem_create create = { .size = size };
	static int instances;
	char path[128];
	int node;

	t->control = open("/dev/umem/control", O_RDWR);
	if (t->control < 0)
		die("/dev/umem/control");
	if (ioctl(t->control, UMEM_API, &api))
		die("UMEM_API");
	snprintf((char *)create.name, sizeof(create.name), "bench-%d-%d", getpid(), instances++);
	if (ioctl(t->control, UMEM_CREATE, &create))
		die("UMEM_CREATE");
	memcpy(t->name.name, create.name, sizeof(t->name.name));
	snprintf(path, sizeof(path), "/dev/umem/%s", create.name);
	node = open(path, O_RDWR);
	if (node < 0)
		die(path);
	t->mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, node, 0);
	if (t->mem == MAP_FAILED)
		die("mmap umem");
	close(node);
	t->server_fd = create.fd;
}

static void open_uffd(struct target *t, size_t size)
{
	struct uffdio_api api = { .api = UFFD_API };
	struct uffdio_register reg = { 0 };

	t->server_fd = syscall(SYS_userfaultfd, O_CLOEXEC);
	if (t->server_fd < 0)
		die("userfaultfd");
	if (ioctl(t->server_fd, UFFDIO_API, &api))
		die("UFFDIO_API");
	t->mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (t->mem == MAP_FAILED)
		die("mmap anon");
	reg.range.start = (unsigned long)t->mem;
	reg.range.len = size;
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl(t->server_fd, UFFDIO_REGISTER, &reg))
		die("UFFDIO_REGISTER");
}

static void close_target(struct target *t)
{
	munmap(t->mem, t->size);
	close(t->server_fd);
	if (t->umem) {
		if (ioctl(t->control, UMEM_DESTROY, &t->name))
			die("UMEM_DESTROY");
		close(t->control);
	}
	free(t->source);
}

static void open_target(struct target *t, const char *kind, size_t size)
{
	t->umem = !strcmp(kind, "umem");
	t->size = size;
	t->source = aligned_alloc(PAGE, size);
	if (!t->source)
		die("source");
	memset(t->source, 0x5a, size);
	if (t->umem)
		open_umem(t, size);
	else
		open_uffd(t, size);
}

/* Fill [offset, offset + len) from the source; one syscall. */
static void fill(struct target *t, size_t offset, size_t len)
{
	if (t->umem) {
		struct umem_fill_range range = {
			.offset = offset, .len = len,
			.src = (uint64_t)(uintptr_t)(t->source + offset),
		};
		struct umem_fill req = {
			.ranges = (uint64_t)(uintptr_t)&range, .count = 1,
		};

		if (ioctl(t->server_fd, UMEM_FILL, &req))
			die("UMEM_FILL");
	} else {
		struct uffdio_copy copy = {
			.dst = (unsigned long)t->mem + offset,
			.src = (unsigned long)t->source + offset,
			.len = len,
		};

		if (ioctl(t->server_fd, UFFDIO_COPY, &copy) && errno != EEXIST)
			die("UFFDIO_COPY");
	}
}

/* Read one fault and return its offset in the mapping. */
static size_t read_fault(struct target *t)
{
	if (t->umem) {
		struct umem_fault msg;

		if (read(t->server_fd, &msg, sizeof(msg)) != sizeof(msg))
			die("read umem");
		return msg.offset;
	} else {
		struct uffd_msg msg;

		if (read(t->server_fd, &msg, sizeof(msg)) != sizeof(msg))
			die("read uffd");
		return (msg.arg.pagefault.address & ~(PAGE - 1)) - (unsigned long)t->mem;
	}
}

static size_t pages_to_serve;

static void *serve(void *arg)
{
	struct target *t = arg;
	size_t i;

	for (i = 0; i < pages_to_serve; i++)
		fill(t, read_fault(t), PAGE);
	return NULL;
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return (x > y) - (x < y);
}

static int roundtrip(const char *kind, size_t pages)
{
	struct target t;
	pthread_t server;
	double *lat = calloc(pages, sizeof(*lat));
	volatile char sink;
	size_t i;

	open_target(&t, kind, pages * PAGE);
	pages_to_serve = pages;
	pthread_create(&server, NULL, serve, &t);
	for (i = 0; i < pages; i++) {
		double start = now_us();

		sink = t.mem[i * PAGE];
		lat[i] = now_us() - start;
	}
	(void)sink;
	pthread_join(server, NULL);
	qsort(lat, pages, sizeof(*lat), cmp_double);
	printf("{\"test\": \"roundtrip\", \"kind\": \"%s\", \"faults\": %zu, "
	       "\"p50_us\": %.1f, \"p90_us\": %.1f, \"p99_us\": %.1f, \"max_us\": %.1f}\n",
	       kind, pages, lat[pages / 2], lat[pages * 9 / 10], lat[pages * 99 / 100],
	       lat[pages - 1]);
	close_target(&t);
	free(lat);
	return 0;
}

static int fill_throughput(const char *kind, size_t bytes, size_t batch)
{
	struct target t;
	double start, secs;
	size_t off;

	open_target(&t, kind, bytes);
	start = now_us();
	for (off = 0; off < bytes; off += batch)
		fill(&t, off, batch);
	secs = (now_us() - start) / 1e6;
	printf("{\"test\": \"fill\", \"kind\": \"%s\", \"bytes\": %zu, \"batch\": %zu, "
	       "\"mib_per_s\": %.1f}\n", kind, bytes, batch, bytes / secs / (1 << 20));
	close_target(&t);
	return 0;
}

int main(int argc, char **argv)
{
	if (argc == 4 && !strcmp(argv[1], "roundtrip"))
		return roundtrip(argv[2], strtoull(argv[3], NULL, 0));
	if (argc == 5 && !strcmp(argv[1], "fill"))
		return fill_throughput(argv[2], strtoull(argv[3], NULL, 0),
				       strtoull(argv[4], NULL, 0));
	fprintf(stderr, "usage: %s roundtrip umem|uffd PAGES\n"
		"       %s fill umem|uffd BYTES BATCH\n", argv[0], argv[0]);
	return 2;
}
