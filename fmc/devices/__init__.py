"""Device support the pinned TVM wheel lacks, shared by the compiler's targets and the runtime:
the CUDA driver library (a stub on machines without one) and fmc's Vulkan runtime plugin.
Imports neither side, so loading an artifact never imports a target plugin."""
