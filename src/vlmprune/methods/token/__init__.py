"""Visual-token methods: decide which visual tokens leave the sequence, and from which layer."""
