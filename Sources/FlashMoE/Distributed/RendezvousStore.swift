/// The key-value store the ranks of a one-process-per-GPU group meet through: `RendezvousTCPStore` (rank 0 serves
/// it on a host:port) or `RendezvousDirectoryStore` (files in a directory every rank can reach). Calls never
/// block waiting for a key; `Rendezvous` polls with a deadline.
public protocol RendezvousStore: AnyObject, Sendable {
    /// Stores `value` under `key`. With `exclusive`, nothing is stored and the result is false when the key exists.
    func set(_ key: String, _ value: [UInt8], exclusive: Bool) throws(RendezvousError) -> Bool
    /// The value under `key`, or nil when there is none yet.
    func get(_ key: String) throws(RendezvousError) -> [UInt8]?
    /// Removes `key` (absent keys are fine).
    func delete(_ key: String) throws(RendezvousError)
    /// Releases the store (rank 0's TCP store stops serving). Idempotent.
    func close()
    /// Where the store is, for messages: `tcp://HOST:PORT` or `dir:/PATH`.
    var location: String { get }
}
