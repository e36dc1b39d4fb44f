import CFlashMoEABI
import FlashMoE
import Synchronization

/// The arguments of one forward, checked by `flashmoe_layer_forward` (token range, NULLs, alignment).
struct ForwardArguments {
    let x: UInt64
    let y: UInt64
    let tokens: Int
    let ids: UnsafeMutablePointer<Int32>?
    let weights: UnsafeMutablePointer<Float>?
    let stream: UnsafeMutableRawPointer?
}

/// What a layer handle runs: the CPU backend or the fused GPU operator.
protocol LayerEngine: AnyObject, Sendable {
    /// The checked settings the layer was created from.
    var settings: LayerSettings { get }
    /// Bytes of y's elements: 4 (float32) or the storage type's size.
    var outputElementBytes: Int { get }
    /// The alignment x and y must have, in bytes: their element size on the CPU, 16 on the GPU (vector loads).
    var rowAlignment: Int { get }
    /// Runs one forward (`arguments` already checked against the layer's shape and token limit).
    func forward(_ arguments: ForwardArguments) throws
    /// Reports a kernel error an earlier forward left, after waiting for `stream` when `synchronize`.
    func check(synchronize: Bool, stream: UnsafeMutableRawPointer?) throws
    /// Fills the fields of `info` other than `size`.
    func describe(_ info: inout flashmoe_layer_info_t)
}

/// One created layer behind a `flashmoe_layer_t`. Calls on one layer are serialised by `calls`.
final class LayerHandle: Sendable {
    let engine: any LayerEngine
    let calls = Mutex(())

    init(engine: any LayerEngine) { self.engine = engine }

    /// Runs `body` with the layer's engine, one call at a time.
    func serialized<R>(_ body: (any LayerEngine) throws -> R) throws -> R {
        try calls.withLock { _ in try body(engine) }
    }
}

/// The live handles of one kind (layers, groups). A handle is an `Unmanaged` retain of its object; every call
/// looks it up here first, so a NULL, destroyed or made-up handle is an argument error instead of a crash. (An
/// address freed by destroy may be reused by a later create; a stale handle then names the new object, as with
/// any allocator-backed handle.)
final class HandleRegistry<Handle: AnyObject & Sendable>: Sendable {
    private let live = Mutex<Set<UInt>>([])
    /// The argument's name ("layer", "group") and the function that creates one, for messages.
    let name: String
    let creator: String

    init(name: String, creator: String) {
        self.name = name
        self.creator = creator
    }

    /// Registers `handle` and returns the opaque pointer the caller holds.
    func register(_ handle: Handle) -> OpaquePointer {
        let opaque = Unmanaged.passRetained(handle).toOpaque()
        _ = live.withLock { $0.insert(UInt(bitPattern: opaque)) }
        return OpaquePointer(opaque)
    }

    /// The object behind `pointer` (a strong reference: a concurrent destroy cannot free it while in use).
    func lookup(_ pointer: OpaquePointer?) throws(ArgumentError) -> Handle {
        guard let pointer else { throw ArgumentError("\(name) is NULL: pass a handle from \(creator)") }
        let bits = UInt(bitPattern: UnsafeRawPointer(pointer))
        let handle: Handle? = live.withLock { set in
            set.contains(bits) ? Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(pointer)).takeUnretainedValue() : nil
        }
        guard let handle else {
            throw ArgumentError(
                "\(name) (0x\(String(bits, radix: 16))) is not a live handle: it was destroyed or never created")
        }
        return handle
    }

    /// Unregisters `pointer` and drops the registry's reference; false when it was not live.
    func remove(_ pointer: OpaquePointer) -> Bool {
        let bits = UInt(bitPattern: UnsafeRawPointer(pointer))
        guard live.withLock({ $0.remove(bits) != nil }) else { return false }
        Unmanaged<Handle>.fromOpaque(UnsafeRawPointer(pointer)).release()
        return true
    }

    /// Destroy's check: unregisters `pointer` (NULL is a no-op) or throws naming the stale handle.
    func destroy(_ pointer: OpaquePointer?) throws(ArgumentError) {
        guard let pointer else { return }
        guard remove(pointer) else {
            throw ArgumentError(
                "\(name) (0x\(String(UInt(bitPattern: UnsafeRawPointer(pointer)), radix: 16))) is not a live handle: "
                    + "it was destroyed already or never created")
        }
    }
}

/// The registries of live handles.
enum Handles {
    /// Layers (`flashmoe_layer_t`).
    static let layers = HandleRegistry<LayerHandle>(name: "layer", creator: "flashmoe_layer_create")
    /// Group ranks (`flashmoe_group_t`).
    static let groups = HandleRegistry<GroupHandle>(name: "group", creator: "flashmoe_group_create")
}
