"""Transfer engine: moves bytes between registered memory of two processes (TCP, RDMA, memcpy)."""
