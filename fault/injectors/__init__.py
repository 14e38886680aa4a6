"""Built-in injectors, one module per kind; importing a module registers its faults.

``failpoint`` (store failpoints in this process, the master, or a child at start), ``memory.fill``
and ``memory.fragment`` (real puts and removes), ``network.delay`` / ``network.bandwidth`` /
``network.reset`` / ``network.blackhole`` (the loopback proxy), ``process.kill`` /
``process.stop`` / ``process.restart`` (signals to the master or a holder), ``gc.legacy`` (the
master's ``--enable_gc``). Other modules (the RDMA QP faults) register theirs the same way.
"""
