// Table sizes of every (layer, order, head): the official prime layout (docs/SPEC.md section 2.4).
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "engram/hash.h"

namespace engram {

// Smallest prime strictly above `start` that is not in `used`.
inline uint64_t next_unused_prime(uint64_t start, const std::set<uint64_t>& used) {
  uint64_t c = start + 1;
  while (!is_prime(c) || used.count(c)) ++c;
  return c;
}

// primes[layer][order - 2][head]. One pool of used primes spans all layers; each order restarts
// its search at vocab_size_per_ngram[order - 2] - 1, and each head continues from the previous
// head's prime.
inline std::vector<std::vector<std::vector<int64_t>>> layer_primes(const std::vector<int64_t>& vocab_size_per_ngram,
                                                                   int64_t num_layers, int64_t n_head) {
  if (num_layers < 0 || n_head < 1) {
    throw std::invalid_argument("layer_primes: num_layers must be >= 0 and n_head >= 1, got " +
                                std::to_string(num_layers) + " and " + std::to_string(n_head));
  }
  for (int64_t v : vocab_size_per_ngram) {
    if (v < 2) {
      throw std::invalid_argument("layer_primes: every vocab_size_per_ngram entry must be >= 2, got " +
                                  std::to_string(v));
    }
  }
  std::set<uint64_t> used;
  std::vector<std::vector<std::vector<int64_t>>> out(num_layers);
  for (int64_t l = 0; l < num_layers; ++l) {
    for (int64_t v : vocab_size_per_ngram) {
      std::vector<int64_t> heads;
      uint64_t start = static_cast<uint64_t>(v) - 1;
      for (int64_t j = 0; j < n_head; ++j) {
        uint64_t p = next_unused_prime(start, used);
        used.insert(p);
        heads.push_back(static_cast<int64_t>(p));
        start = p;
      }
      out[l].push_back(std::move(heads));
    }
  }
  return out;
}

}  // namespace engram
