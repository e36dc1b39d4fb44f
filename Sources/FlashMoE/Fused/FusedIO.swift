import CCUDA

/// Host ↔ device helpers shared by the fused operators.
enum FusedIO {
    /// Fills `floats` FP32 values at `offset` with NaN (0xFFFFFFFF): an element the kernel fails to write cannot
    /// pass any check afterwards.
    static func poison(_ arena: DeviceBuffer<UInt8>, offset: Int, floats: Int, device: CUDADevice) throws {
        try device.makeCurrent()
        try device.driver.check(
            device.driver.memsetD32(arena.address + UInt64(offset), 0xFFFF_FFFF, floats, nil),
            "cuMemsetD32_v2(poison output)")
    }

    /// A new device buffer holding `t`'s bytes.
    static func upload(_ t: HostTensor, device: CUDADevice) throws -> DeviceBuffer<UInt8> {
        let buffer = try DeviceBuffer<UInt8>(device: device, count: max(t.byteCount, 1))
        try t.withUnsafeBytes { try buffer.upload($0) }
        return buffer
    }

    /// `t` [S, H] with its rows in reverse order, stored as `type`: a second, different input of the same shape.
    static func reversedRows(_ t: HostTensor, as type: ElementType) throws -> HostTensor {
        let (s, h) = (t.shape[0], t.shape[1])
        let v = t.floats()
        var out = [Float](repeating: 0, count: v.count)
        for r in 0..<s { out[r * h..<(r + 1) * h] = v[(s - 1 - r) * h..<(s - r) * h] }
        return try HostTensor(shape: t.shape, values: out, as: type)
    }

    /// `warmup` untimed launches, then one CUDA-event interval per timed launch (milliseconds).
    static func time(device: CUDADevice, warmup: Int, iterations: Int, launch: (Int) throws -> Void) throws -> [Double] {
        let start = try CUDAEvent(device: device), stop = try CUDAEvent(device: device)
        for i in 0..<max(warmup, 0) { try launch(i) }
        try device.synchronize()
        var samples: [Double] = []
        for i in 0..<max(iterations, 1) {
            try start.record()
            try launch(i)
            try stop.record()
            try stop.synchronize()
            samples.append(try stop.elapsedMilliseconds(since: start))
        }
        return samples
    }

    /// Reads the kernel's error record at `offset` of `control`; on an error, zeroes `control` and every arena (the
    /// aborted launch left its counters mid-protocol; epochs restart at 0) and returns the decoded record.
    static func takeError(control: DeviceBuffer<UInt8>, offset: Int, arenas: [DeviceBuffer<UInt8>]) throws
        -> FusedKernelError?
    {
        guard let error = FusedKernelError.decode(try control.download(count: 40, from: offset)) else { return nil }
        try control.fill(byte: 0)
        for a in arenas { try a.fill(byte: 0) }
        return error
    }

    /// `count` values of type T read from the arena at byte `offset`.
    static func read<T: BitwiseCopyable>(_ arena: DeviceBuffer<UInt8>, _ offset: Int, count: Int) throws -> [T] {
        try arena.download(as: T.self, count: count, from: offset)
    }
}
