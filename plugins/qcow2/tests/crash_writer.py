"""Writer process for the crash test: random writes, zeroes and discards on the first half
of the image; in the second half, chunk i (a permutation) is written, flushed and then
announced on stdout, so the parent knows which chunks must survive SIGKILL."""

from __future__ import annotations

import random
import sys

from vmm_qcow2.image import Qcow2File


def pattern(n: int, seed: int) -> bytes:
    block = bytes((seed * 7 + i * 13 + (i >> 8)) & 0xFF for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def main() -> None:
    path, seed, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rnd = random.Random(seed)
    d = Qcow2File(path, False)
    half = d.size // 2
    order = list(range(half // chunk))
    rnd.shuffle(order)
    for i in order:
        for _ in range(3):
            off = rnd.randrange(half - 1)
            n = min(half - off, rnd.choice([512, 4096, 30_000, 200_000]))
            r = rnd.random()
            if r < 0.6:
                d.write_from(off, [memoryview(pattern(n, rnd.randrange(256)))])
            elif r < 0.8:
                d.write_zeroes(off, n, may_unmap=rnd.random() < 0.5)
            else:
                d.discard(off, n)
        d.write_from(half + i * chunk, [memoryview(pattern(chunk, i))])
        d.flush()
        print(i, flush=True)
    d.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
