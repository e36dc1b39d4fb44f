import ArgumentParser
import FlashMoE

// The model's enums are parsed from their raw values; ArgumentParser lists the valid ones in help and errors.

extension Precision: ExpressibleByArgument {}
extension FFNKind: ExpressibleByArgument {}
extension Activation: ExpressibleByArgument {}
extension RankTransport: ExpressibleByArgument {}
