//! Kademlia routing core: XOR keys, k-buckets and the iterative lookup state machine (sans-IO).
