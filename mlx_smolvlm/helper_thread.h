/* One persistent helper thread that shares a job with its caller, for the C kernels of this
 * package (blas_shim.c, quantized_matvec.c); each includes this header once (after defining
 * _GNU_SOURCE) and keeps one static helper_pool.
 *
 * A job is cut into chunks that the caller and the helper claim one at a time, so a helper
 * that the OS has not scheduled (the machine is busy) costs nothing: the caller computes every
 * chunk itself. Creating a thread per call costs more than the products of a small model take,
 * so the helper spins for a while after each job (decoding calls again within microseconds),
 * then sleeps. Both sides yield the CPU while they wait, so other threads keep running. */
#ifndef MLX_SMOLVLM_HELPER_THREAD_H
#define MLX_SMOLVLM_HELPER_THREAD_H

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define HELPER_SPIN_NS 200000L

typedef struct {
  void (*run_chunk)(const void *job, int chunk); /* computes one chunk of a job */
  pid_t pid; /* the process that started the helper (a forked child starts its own) */
  const void *job;
  int n_chunks;
  atomic_int claimed, finished; /* chunks of the current job claimed and finished */
  atomic_uint posted, taken;    /* jobs posted; jobs the helper is done with */
  atomic_int sleeping, busy;
  pthread_mutex_t lock;
  pthread_cond_t wake;
} helper_pool;

#define HELPER_POOL(chunk_fn) \
  {.run_chunk = (chunk_fn), .lock = PTHREAD_MUTEX_INITIALIZER, .wake = PTHREAD_COND_INITIALIZER}

static long now_ns(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void pause_briefly(int spins) {
  if ((spins & 63) == 63) {
    sched_yield();
    return;
  }
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

/* Claim and compute chunks of the current job until none is left. */
static void run_chunks(helper_pool *p) {
  for (int c; (c = atomic_fetch_add(&p->claimed, 1)) < p->n_chunks;) {
    p->run_chunk(p->job, c);
    atomic_fetch_add(&p->finished, 1);
  }
}

static void *helper_main(void *arg) {
  helper_pool *p = arg;
  for (;;) {
    unsigned seen = atomic_load(&p->taken);
    long spin_end = now_ns() + HELPER_SPIN_NS;
    for (int spins = 0; atomic_load(&p->posted) == seen; spins++) {
      if ((spins & 255) == 0 && now_ns() > spin_end) {
        pthread_mutex_lock(&p->lock);
        atomic_store(&p->sleeping, 1);
        while (atomic_load(&p->posted) == seen) pthread_cond_wait(&p->wake, &p->lock);
        atomic_store(&p->sleeping, 0);
        pthread_mutex_unlock(&p->lock);
      }
      pause_briefly(spins);
    }
    run_chunks(p);
    atomic_store(&p->taken, seen + 1);
  }
  return NULL;
}

/* Whether the helper runs in this process (started on first use, again after a fork). */
static int helper_ready(helper_pool *p) {
  if (p->pid == getpid()) return 1;
  atomic_store(&p->taken, atomic_load(&p->posted));
  pthread_t thread;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
  int ok = pthread_create(&thread, &attr, helper_main, p) == 0;
  pthread_attr_destroy(&attr);
  if (ok) p->pid = getpid();
  return ok;
}

/* Computes the `n_chunks` chunks of `job` with the helper and returns 1 once all are done; or
 * returns 0 having computed nothing (then the caller computes alone). One caller at a time
 * shares with the helper, and only once the helper is done with the previous job. */
static int helper_share(helper_pool *p, const void *job, int n_chunks) {
  int expected = 0;
  if (!atomic_compare_exchange_strong(&p->busy, &expected, 1)) return 0;
  if (!helper_ready(p) || atomic_load(&p->taken) != atomic_load(&p->posted)) {
    atomic_store(&p->busy, 0);
    return 0;
  }
  p->job = job;
  p->n_chunks = n_chunks;
  atomic_store(&p->claimed, 0);
  atomic_store(&p->finished, 0);
  atomic_fetch_add(&p->posted, 1);
  if (atomic_load(&p->sleeping)) {
    pthread_mutex_lock(&p->lock);
    pthread_cond_signal(&p->wake);
    pthread_mutex_unlock(&p->lock);
  }
  run_chunks(p);
  for (int spins = 0; atomic_load(&p->finished) < p->n_chunks; spins++) pause_briefly(spins);
  atomic_store(&p->busy, 0);
  return 1;
}

#endif
