// Host buffers, file input / output and main() shared by the emulation runners (runner.cpp,
// group_pool_runner.cpp).
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <initializer_list>
#include <stdexcept>
#include <utility>

// Bytes per element of a dtype code: 0 float32, 1 float16, 2 bfloat16, 3 float64 (DType's values).
inline size_t dtype_size(int64_t code) { return code == 3 ? 8 : (code == 0 ? 4 : 2); }

struct Buffer {
  void* ptr = nullptr;
  explicit Buffer(size_t bytes) : ptr(std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64)) {
    std::memset(ptr, 0xA5, (bytes + 63) / 64 * 64 + 64);  // poison: unwritten outputs show up
  }
  ~Buffer() { std::free(ptr); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr); }
};

inline void read_exact(FILE* f, void* dst, size_t bytes) {
  if (bytes && std::fread(dst, 1, bytes, f) != bytes) throw std::runtime_error("short input file");
}

// Writes the parts (pointer, bytes) one after the other to `path`.
inline void write_parts(const char* path, std::initializer_list<std::pair<const void*, size_t>> parts) {
  FILE* o = std::fopen(path, "wb");
  if (!o) throw std::runtime_error("cannot open output");
  for (const auto& [ptr, bytes] : parts) std::fwrite(ptr, 1, bytes, o);
  std::fclose(o);
}

// main() of a runner invoked as `runner IN OUT`: run(in, out_path) reads the open IN and writes OUT;
// errors go to stderr with exit status 1.
template <typename Run>
int runner_main(int argc, char** argv, Run run) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  try {
    FILE* in = std::fopen(argv[1], "rb");
    if (!in) throw std::runtime_error("cannot open input");
    run(in, argv[2]);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "runner: %s\n", e.what());
    return 1;
  }
  return 0;
}
