// SPDX-License-Identifier: GPL-2.0
/*
 * fault_flood NODE PAGES REQUESTED: queue one fault record per page of the
 * instance at NODE, from one thread, with nobody serving them.
 *
 * The main thread touches page 0, 1, ... in turn; each touch blocks in the
 * fault. A second thread watches the instance's sysfs counter REQUESTED
 * (stats/requested) and, each time it has grown by one, interrupts the
 * fault with SIGUSR1, whose handler jumps to the next page. The record
 * stays queued. Prints the number of pages touched.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

static sigjmp_buf next_page;

struct watch {
	pthread_t faulter;
	int counter;
	long base;
	long pages;
};

static void on_signal(int signo)
{
	(void)signo;
	siglongjmp(next_page, 1);
}

static long read_counter(int fd)
{
	char buf[32];
	ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);

	if (n <= 0) {
		perror("pread");
		exit(2);
	}
	buf[n] = 0;
	return atol(buf);
}

static void *watch(void *arg)
{
	struct watch *w = arg;
	long i;

	for (i = 1; i <= w->pages; i++) {
		while (read_counter(w->counter) < w->base + i)
			sched_yield();
		pthread_kill(w->faulter, SIGUSR1);
	}
	return NULL;
}

int main(int argc, char **argv)
{
	struct sigaction sa = { .sa_handler = on_signal };
	long page = sysconf(_SC_PAGESIZE);
	volatile long i;
	struct watch w;
	pthread_t watcher;
	char *mem;
	int fd;

	if (argc != 4) {
		fprintf(stderr, "usage: %s NODE PAGES REQUESTED\n", argv[0]);
		return 2;
	}
	w.pages = atol(argv[2]);
	fd = open(argv[1], O_RDWR);
	w.counter = open(argv[3], O_RDONLY);
	if (fd < 0 || w.counter < 0) {
		perror("open");
		return 2;
	}
	mem = mmap(NULL, w.pages * page, PROT_READ, MAP_SHARED, fd, 0);
	if (mem == MAP_FAILED) {
		perror("mmap");
		return 2;
	}
	sigemptyset(&sa.sa_mask);
	if (sigaction(SIGUSR1, &sa, NULL))
		return 2;
	w.faulter = pthread_self();
	w.base = read_counter(w.counter);
	if (pthread_create(&watcher, NULL, watch, &w))
		return 2;
	for (i = 0; i < w.pages; i++)
		if (!sigsetjmp(next_page, 1))
			(void)*(volatile char *)(mem + i * page);
	pthread_join(watcher, NULL);
	printf("%ld\n", (long)i);
	return 0;
}
