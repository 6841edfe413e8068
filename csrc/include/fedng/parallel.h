// Scheduling of ragged work across the threads torch allows, without oversubscription:
// a matrix either gets all threads inside OpenBLAS, or one thread of ours with OpenBLAS serial.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

namespace fedng {

// Runs fn(i) for every i in [0, n) on up to `nthreads` threads, the caller included.
// The first exception thrown by any fn is rethrown on the caller after all work stops.
void parallel_for(std::int64_t n, int nthreads, const std::function<void(std::int64_t)>& fn);

// Sets OpenBLAS's thread count (cached: repeated calls with the same value are free).
void set_blas_threads(int n);

// Runs fn(i) for every item with an estimated cost (flops). Items too large to balance across
// threads run one after another with a threaded BLAS; the rest run in parallel, largest first,
// each with a serial BLAS.
void run_ragged(const std::vector<double>& cost, int nthreads,
                const std::function<void(std::int64_t)>& fn);

}  // namespace fedng
