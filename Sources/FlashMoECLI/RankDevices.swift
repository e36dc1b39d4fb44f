/// The `--rank-devices` option of `bench` and `verify`: the GPU of each kernel launch of the ranks.
enum RankDevices {
    /// "0,0,1" → [0, 0, 1].
    static func parse(_ text: String) throws(CLIError) -> [Int] {
        var out: [Int] = []
        for part in text.split(separator: ",") {
            guard let v = Int(part.filter { $0 != " " }), v >= 0 else {
                throw CLIError(.invalidValue, "--rank-devices takes GPU ordinals like 0,1 (got \"\(text)\")")
            }
            out.append(v)
        }
        guard !out.isEmpty else { throw CLIError(.invalidValue, "--rank-devices needs at least one GPU ordinal") }
        return out
    }
}
