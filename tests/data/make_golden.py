"""Regenerates golden_hash.txt: row ids from an independent pure-NumPy transcription of the
official hashing (docs/SPEC.md section 2), for GoogleTest and pytest to share.

Run: python tests/data/make_golden.py > tests/data/golden_hash.txt
"""

import numpy as np


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def official_primes(vocab_sizes, num_layers, n_head):
    seen, out = set(), []
    for _ in range(num_layers):
        layer = []
        for v in vocab_sizes:
            start = v - 1
            for _ in range(n_head):
                c = start + 1
                while not is_prime(c) or c in seen:
                    c += 1
                seen.add(c)
                layer.append(c)
                start = c
        out.append(layer)
    return out


def official_multipliers(v_comp, n, layer_ids, seed):
    half = max(1, int(np.iinfo(np.int64).max // v_comp) // 2)
    return [
        np.random.default_rng(int(seed + 10007 * int(layer))).integers(0, half, size=(n,), dtype=np.int64) * 2 + 1
        for layer in layer_ids
    ]


def official_rows(x, mult, primes, n, k_heads, pad):
    _B, T = x.shape
    shifts = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(1, n)]
    cols, base = [], 0
    for order in range(2, n + 1):
        mix = shifts[0] * mult[0]
        for k in range(1, order):
            mix = np.bitwise_xor(mix, shifts[k] * mult[k])
        for j in range(k_heads):
            p = primes[(order - 2) * k_heads + j]
            cols.append(mix % p + base)
            base += p
    return np.stack(cols, axis=2)


CASES = {
    # name: (engram_vocab_size, max_ngram_size, n_head, layer_ids, compressed vocab, pad, seed)
    "demo": ([646400, 646400], 3, 8, [1, 15], 129280, 2, 0),
    "small4": ([1000, 2000, 3000], 4, 2, [0, 3, 7], 997, 5, 42),
}


def main():
    rng = np.random.default_rng(1234)
    for name, (vs, n, k, layers, v_comp, pad, seed) in CASES.items():
        primes = official_primes(vs, len(layers), k)
        mult = official_multipliers(v_comp, n, layers, seed)
        for t in (1, 2, 17):
            x = rng.integers(0, v_comp, size=(2, t), dtype=np.int64)
            print(
                f"case {name} {' '.join(map(str, vs))} | {n} {k} {v_comp} {pad} {seed} | "
                f"{' '.join(map(str, layers))} | {t}"
            )
            print("ids", " ".join(map(str, x.ravel())))
            for li in range(len(layers)):
                print("mult", " ".join(map(str, mult[li])))
                print("rows", " ".join(map(str, official_rows(x, mult[li], primes[li], n, k, pad).ravel())))


if __name__ == "__main__":
    main()
