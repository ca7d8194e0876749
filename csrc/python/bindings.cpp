// Python module torch_engram._C: loading it registers the engram ops (TORCH_LIBRARY in the same
// library); pybind11 binds the non-tensor helpers (prime search, table layout).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../cpu/ngram_hash_kernels.h"
#include "engram/primes.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "torch-engram native ops and layout helpers";
  m.def(
      "is_prime", [](uint64_t n) { return engram::is_prime(n); }, py::arg("n"),
      "Deterministic primality test for any 64-bit integer.");
  m.def("layer_primes", &engram::layer_primes, py::arg("vocab_size_per_ngram"), py::arg("num_layers"),
        py::arg("n_head"),
        "Table sizes primes[layer][order-2][head] of the official layout: one pool of used primes "
        "across layers, each order restarting at vocab_size_per_ngram[order-2] - 1.");
  m.def(
      "ngram_hash_isa", []() { return std::string(engram::cpu::isa_name(engram::cpu::ngram_hash_isa())); },
      "CPU ngram_hash kernel for tables whose primes all lie in [2^14, 2^31) and whose heads per "
      "order are a multiple of 8: avx512 or portable (other tables always use the portable one). "
      "The environment variable ENGRAM_NGRAM_HASH_ISA caps it.");
  m.def("cuda_built", []() {
#ifdef ENGRAM_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
