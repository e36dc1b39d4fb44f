/// The storage of a block-scaled FP8 tensor: E4M3 codes and one FP32 scale per 128×128 block of each matrix.
///
/// A tensor of shape [d₀, …, rows, cols] is a stack of `matrices` = d₀·…·d_{n−3} matrices [rows, cols] (a 1-D
/// tensor is one matrix of one row). Element (m, r, c) is `codes[(m·rows + r)·cols + c].float × scales[(m·br +
/// r/128)·bc + c/128]`, with br = ⌈rows/128⌉ and bc = ⌈cols/128⌉: DeepSeek-V3's `weight_scale_inv` layout
/// [⌈out/128⌉, ⌈in/128⌉] per matrix, the scale being the multiplier that dequantizes.
public struct FP8Blocks: Sendable, Equatable {
    /// The E4M3 codes, row-major like the tensor.
    public let codes: [FP8E4M3]
    /// The block scales, [matrices, ⌈rows/128⌉, ⌈cols/128⌉] row-major.
    public let scales: [Float]
    /// Rows of each matrix (the second-to-last dimension; 1 for a 1-D tensor).
    public let rows: Int
    /// Columns of each matrix (the last dimension).
    public let cols: Int

    /// Blocks along the rows, ⌈rows/128⌉.
    public var blockRows: Int { (rows + FP8Scaling.blockSize - 1) / FP8Scaling.blockSize }
    /// Blocks along the columns, ⌈cols/128⌉.
    public var blockCols: Int { (cols + FP8Scaling.blockSize - 1) / FP8Scaling.blockSize }

    /// The (rows, cols) a tensor of `shape` is split into, and how many matrices it stacks.
    public static func layout(_ shape: [Int]) -> (matrices: Int, rows: Int, cols: Int) {
        switch shape.count {
        case 0: (1, 1, 1)
        case 1: (1, 1, shape[0])
        default: (shape.dropLast(2).reduce(1, *), shape[shape.count - 2], shape[shape.count - 1])
        }
    }

    /// The scale shape for a tensor of `shape`: [leading dims…, ⌈rows/128⌉, ⌈cols/128⌉] (1-D: [⌈n/128⌉]).
    public static func scaleShape(_ shape: [Int]) -> [Int] {
        let b = FP8Scaling.blockSize
        switch shape.count {
        case 0: return []
        case 1: return [(shape[0] + b - 1) / b]
        default:
            return shape.dropLast(2) + [(shape[shape.count - 2] + b - 1) / b, (shape[shape.count - 1] + b - 1) / b]
        }
    }

    /// Wraps codes and scales for a tensor of `shape`; throws unless the counts match the shape.
    public init(shape: [Int], codes: [FP8E4M3], scales: [Float]) throws(MoEError) {
        let (m, r, c) = Self.layout(shape)
        let scaleCount = Self.scaleShape(shape).reduce(1, *)
        guard codes.count == m * r * c, scales.count == scaleCount else {
            throw MoEError(
                .shapeMismatch,
                "an FP8 tensor of shape \(shape) needs \(m * r * c) codes and \(scaleCount) block scales (shape \(Self.scaleShape(shape))), got \(codes.count) and \(scales.count)"
            )
        }
        self.codes = codes
        self.scales = scales
        self.rows = r
        self.cols = c
    }

    /// Quantizes FP32 values of a tensor of `shape` block by block: each 128×128 block's scale is
    /// `FP8Scaling.scale(amax:)` of its finite values and each value is `FP8Scaling.encode`d with it.
    public init(shape: [Int], quantizing values: [Float]) {
        self.init(shape: shape) { matrix, out in
            let per = out.count
            values.withUnsafeBufferPointer { out.baseAddress!.update(from: $0.baseAddress! + matrix * per, count: per) }
        }
    }

    /// Quantizes a tensor of any element type, one matrix at a time (no FP32 copy of the whole stack).
    public init(quantizing tensor: HostTensor) {
        self.init(shape: tensor.shape) { matrix, out in
            tensor.copyFloats(offset: matrix * out.count, count: out.count, into: out.baseAddress!)
        }
    }

    /// Quantizes matrix by matrix; `load(m, buffer)` writes matrix m's FP32 values into `buffer` (rows × cols).
    private init(shape: [Int], load: @Sendable (Int, UnsafeMutableBufferPointer<Float>) -> Void) {
        let (m, r, c) = Self.layout(shape)
        let b = FP8Scaling.blockSize
        let (br, bc) = ((r + b - 1) / b, (c + b - 1) / b)
        var codes = [FP8E4M3](repeating: FP8E4M3(bitPattern: 0), count: m * r * c)
        var scales = [Float](repeating: 1, count: m * br * bc)
        codes.withUnsafeMutableBufferPointer { cb in
            scales.withUnsafeMutableBufferPointer { sb in
                // Each chunk owns whole matrices: disjoint ranges of codes and scales.
                guard let c0 = cb.baseAddress, let s0 = sb.baseAddress else { return }
                nonisolated(unsafe) let (cp, sp) = (c0, s0)
                parallelChunks(count: m) { matrices in
                    let scratch = UnsafeMutableBufferPointer<Float>.allocate(capacity: max(1, r * c))
                    defer { scratch.deallocate() }
                    let v = scratch.baseAddress!  // the current matrix, [r, c]
                    for mi in matrices {
                        load(mi, UnsafeMutableBufferPointer(rebasing: scratch[0..<(r * c)]))
                        for bi in 0..<br {
                            for bj in 0..<bc {
                                let rowsRange = (bi * b)..<min(r, bi * b + b)
                                let colsRange = (bj * b)..<min(c, bj * b + b)
                                var amax: Float = 0
                                for row in rowsRange {
                                    amax = max(
                                        amax, FP8Scaling.amax(v + row * c + colsRange.lowerBound, count: colsRange.count))
                                }
                                let s = FP8Scaling.scale(amax: amax)
                                sp[(mi * br + bi) * bc + bj] = s
                                for row in rowsRange {
                                    for col in colsRange {
                                        cp[(mi * r + row) * c + col] = FP8Scaling.encode(v[row * c + col], scale: s)
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        self.codes = codes
        self.scales = scales
        self.rows = r
        self.cols = c
    }

    /// The scale of flat element `i`.
    @inlinable
    public func scale(at i: Int) -> Float {
        let per = rows * cols
        let (m, rc) = i.quotientAndRemainder(dividingBy: per)
        let (r, c) = rc.quotientAndRemainder(dividingBy: cols)
        let b = FP8Scaling.blockSize
        return scales[(m * blockRows + r / b) * blockCols + c / b]
    }

    /// Element `i` as FP32: code × scale, rounded to FP32 (exact when the scale has at most 20 significant bits,
    /// e.g. a power of two).
    @inlinable
    public func float(at i: Int) -> Float { codes[i].float * scale(at: i) }

    /// Element `i` as Float64, exactly (a 4-bit significand times a 24-bit one).
    @inlinable
    public func double(at i: Int) -> Double { codes[i].double * Double(scale(at: i)) }

    /// Copies `count` elements from flat index `offset` into `out` as FP32 values (`float(at:)`).
    @inlinable
    public func copyFloats(offset: Int, count: Int, into out: UnsafeMutablePointer<Float>) {
        for j in 0..<count { out[j] = float(at: offset + j) }
    }

    /// Matrices `range` of the stack (their codes and scales).
    func matrices(_ range: Range<Int>) -> FP8Blocks {
        let per = rows * cols, perScale = blockRows * blockCols
        return FP8Blocks(
            unchecked: Array(codes[(range.lowerBound * per)..<(range.upperBound * per)]),
            scales: Array(scales[(range.lowerBound * perScale)..<(range.upperBound * perScale)]), rows: rows,
            cols: cols)
    }

    private init(unchecked codes: [FP8E4M3], scales: [Float], rows: Int, cols: Int) {
        self.codes = codes
        self.scales = scales
        self.rows = rows
        self.cols = cols
    }
}
