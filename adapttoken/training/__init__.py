"""The bundled tiny model's workshop, apart from the method: the synthetic long videos (synthetic.py),
the tiny random models of every family (tiny.py, tiny_families.py) and the script that trained the
bundled one (train_tiny.py). The demo, the benchmarks and the tests use it; the method never does."""
