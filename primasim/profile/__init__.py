"""The device profiler: measures the DeviceSpec quantities the cost model and the simulator use."""
