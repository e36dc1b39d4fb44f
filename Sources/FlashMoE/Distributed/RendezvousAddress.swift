/// Where the ranks of a one-process-per-GPU group meet: `tcp://HOST:PORT` (rank 0 serves a store there) or
/// `dir:/PATH` (a directory every rank can reach).
public enum RendezvousAddress: Sendable, Hashable, CustomStringConvertible {
    /// Rank 0 serves a TCP store on `host:port`; the others connect.
    case tcp(host: String, port: Int)
    /// A store in directory `path`.
    case directory(path: String)

    /// Parses `tcp://HOST:PORT` or `dir:/PATH`; the error shows both forms.
    public init(parsing text: String) throws(RendezvousError) {
        let forms = "give tcp://HOST:PORT (rank 0 serves the store) or dir:/PATH (a directory every rank can reach)"
        if text.hasPrefix("tcp://") {
            let rest = text.dropFirst(6)
            guard let colon = rest.lastIndex(of: ":"), let port = Int(rest[rest.index(after: colon)...]),
                colon != rest.startIndex
            else { throw RendezvousError(.badAddress, "--rendezvous \(text): no host or port: \(forms)") }
            guard (0...65535).contains(port) else {
                throw RendezvousError(.badAddress, "--rendezvous \(text): the port must be 0...65535")
            }
            self = .tcp(host: String(rest[..<colon]), port: port)
        } else if text.hasPrefix("dir:") {
            let path = String(text.dropFirst(4))
            guard !path.isEmpty else { throw RendezvousError(.badAddress, "--rendezvous \(text): no path: \(forms)") }
            self = .directory(path: path)
        } else {
            throw RendezvousError(.badAddress, "--rendezvous \(text): \(forms)")
        }
    }

    /// The address as `--rendezvous` takes it: `tcp://HOST:PORT` or `dir:PATH`.
    public var description: String {
        switch self {
        case .tcp(let host, let port): "tcp://\(host):\(port)"
        case .directory(let path): "dir:\(path)"
        }
    }

    /// Opens the store as `rank` (rank 0 serves a TCP store; the others connect within `timeout`) and joins the
    /// group (`Rendezvous.join`).
    public func join(rank: Int, worldSize: Int, timeout: Duration = .seconds(60)) throws(RendezvousError) -> Rendezvous {
        let store: any RendezvousStore
        switch self {
        case .tcp(let host, let port):
            store = rank == 0
                ? try RendezvousTCPStore.serve(host: host, port: port)
                : try RendezvousTCPStore.connect(host: host, port: port, timeout: timeout)
        case .directory(let path):
            store = try RendezvousDirectoryStore(path: path)
        }
        do {
            return try Rendezvous.join(rank: rank, worldSize: worldSize, store: store, timeout: timeout)
        } catch {
            store.close()
            throw error
        }
    }
}
