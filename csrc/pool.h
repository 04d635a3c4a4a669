// One process-wide pool of worker threads for the kernels.
//
// MLX's CPU stream runs each primitive's work on its own thread; that thread calls run(), takes
// tasks itself, and size() - 1 workers take the others. size() defaults to the CPUs this process
// may run on (its affinity mask), so with the caller the pool puts one thread on each core. After
// a parallel region a worker spins briefly (kSpinMicros) for the next one, which a decode step
// issues within microseconds, then sleeps on a condition variable.
#pragma once

namespace cpu_ext {

using TaskFn = void (*)(void* ctx, int task);

// Run fn(ctx, i) for every i in [0, tasks), spread over the pool; returns when all are done.
// Regions from several threads run one after another.
void parallel_for(int tasks, TaskFn fn, void* ctx);

// Threads a region uses, the caller included.
int num_threads();

// Use n threads (1 runs everything on the caller); n < 1 restores the default.
void set_num_threads(int n);

// The default: the CPUs in this process's affinity mask.
int default_num_threads();

} // namespace cpu_ext
