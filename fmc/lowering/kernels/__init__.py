"""Hand-written TIR kernels that replace TVM's where TVM's are slow on a target."""
