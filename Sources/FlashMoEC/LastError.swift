#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#endif

/// The calling thread's message for its last failed call, as `flashmoe_last_error()` returns it.
///
/// Each thread keeps one heap copy of its message (a `pthread` key whose destructor frees it when the thread
/// exits). A new failure on the same thread frees the old copy, so a returned pointer stays valid until that
/// thread's next failed call; successful calls leave it alone.
enum LastError {
    private static let key: pthread_key_t = {
        var key = pthread_key_t()
        // Cannot fail short of the process running out of keys (1024 per process); the library needs one.
        let status = pthread_key_create(&key) { free($0) }
        precondition(status == 0, "flashmoe: pthread_key_create failed (\(status))")
        return key
    }()

    /// Replaces the calling thread's message with `message`.
    static func set(_ message: String) {
        let copy = strdup(message)  // nil only when out of memory: then the thread's message reads ""
        let old = pthread_getspecific(key)
        _ = pthread_setspecific(key, copy)
        free(old)
    }

    /// The calling thread's message, or "" when it has none.
    static func current() -> UnsafePointer<CChar> {
        guard let message = pthread_getspecific(key) else { return StaticText.pointer("") }
        return UnsafePointer(message.assumingMemoryBound(to: CChar.self))
    }
}

/// Fixed C strings with static storage (string literals are stored NUL-terminated in the binary).
enum StaticText {
    /// A pointer to `text`'s bytes, valid for the life of the process.
    static func pointer(_ text: StaticString) -> UnsafePointer<CChar> {
        UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
    }
}
