"""Layer methods: decide which decoder layers do not run."""
