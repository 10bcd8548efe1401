// png_chart.cpp: tiedlora/chart.h. The image is an 8-bit palette PNG compressed by a small deflate
// encoder of our own (runs of one colour, fixed Huffman codes): a few tens of kilobytes per chart, and no
// zlib to link.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>

#include "tiedlora/chart.h"
#include "tiedlora/error.h"
#include "util/files.h"

namespace tiedlora::chart {
namespace {

// 5x7 glyphs, one byte per row, bit 4 = leftmost column. Lower case is drawn as upper case.
struct Glyph {
  char c;
  std::array<uint8_t, 7> rows;
};
constexpr Glyph kFont[] = {
    {'0', {0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E}}, {'1', {0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E}},
    {'2', {0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F}}, {'3', {0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E}},
    {'4', {0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02}}, {'5', {0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E}},
    {'6', {0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E}}, {'7', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08}},
    {'8', {0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E}}, {'9', {0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C}},
    {'A', {0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}}, {'B', {0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E}},
    {'C', {0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E}}, {'D', {0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C}},
    {'E', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F}}, {'F', {0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10}},
    {'G', {0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F}}, {'H', {0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11}},
    {'I', {0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E}}, {'J', {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C}},
    {'K', {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11}}, {'L', {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F}},
    {'M', {0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11}}, {'N', {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11}},
    {'O', {0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'P', {0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10}},
    {'Q', {0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D}}, {'R', {0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11}},
    {'S', {0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E}}, {'T', {0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04}},
    {'U', {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E}}, {'V', {0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04}},
    {'W', {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A}}, {'X', {0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11}},
    {'Y', {0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04}}, {'Z', {0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F}},
    {'.', {0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, 0x0C}}, {'-', {0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00}},
    {'+', {0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00}}, {':', {0x00, 0x0C, 0x0C, 0x00, 0x0C, 0x0C, 0x00}},
    {'(', {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02}}, {')', {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08}},
    {'/', {0x00, 0x01, 0x02, 0x04, 0x08, 0x10, 0x00}}, {'_', {0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x1F}},
    {',', {0x00, 0x00, 0x00, 0x00, 0x0C, 0x04, 0x08}}, {'=', {0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00}},
    {'%', {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03}}, {'x', {0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00}},
};

enum Colour : uint8_t { kWhite, kBlack, kGrid, kFirstSeries };
constexpr std::array<std::array<uint8_t, 3>, 9> kPalette = {{{255, 255, 255},
                                                             {0, 0, 0},
                                                             {225, 225, 225},
                                                             {31, 119, 180},
                                                             {255, 127, 14},
                                                             {44, 160, 44},
                                                             {214, 39, 40},
                                                             {148, 103, 189},
                                                             {140, 86, 75}}};
constexpr size_t kMaxSeries = kPalette.size() - kFirstSeries;

class Canvas {
 public:
  Canvas(int w, int h) : w_(w), h_(h), pixels_(static_cast<size_t>(w) * h, kWhite) {}
  void set(int x, int y, uint8_t c) {
    if (x >= 0 && y >= 0 && x < w_ && y < h_) pixels_[static_cast<size_t>(y) * w_ + x] = c;
  }
  void rect(int x0, int y0, int x1, int y1, uint8_t c) {
    for (int y = y0; y <= y1; ++y)
      for (int x = x0; x <= x1; ++x) set(x, y, c);
  }
  void line(int x0, int y0, int x1, int y1, uint8_t c, int thickness = 1) {
    const int dx = std::abs(x1 - x0), dy = -std::abs(y1 - y0), sx = x0 < x1 ? 1 : -1, sy = y0 < y1 ? 1 : -1;
    int err = dx + dy;
    for (;;) {
      rect(x0, y0, x0 + thickness - 1, y0 + thickness - 1, c);
      if (x0 == x1 && y0 == y1) break;
      const int e2 = 2 * err;
      if (e2 >= dy) err += dy, x0 += sx;
      if (e2 <= dx) err += dx, y0 += sy;
    }
  }
  static int text_width(const std::string& s, int scale) { return static_cast<int>(s.size()) * 6 * scale; }
  void text(int x, int y, const std::string& s, uint8_t c, int scale = 1, bool vertical = false) {
    for (char ch : s) {
      const char up = (ch >= 'a' && ch <= 'z' && ch != 'x') ? static_cast<char>(ch - 'a' + 'A') : ch;
      for (const Glyph& g : kFont) {
        if (g.c != up) continue;
        for (int row = 0; row < 7; ++row)
          for (int col = 0; col < 5; ++col)
            if (g.rows[row] & (0x10 >> col)) {
              if (vertical) {
                rect(x + row * scale, y - col * scale, x + row * scale + scale - 1, y - col * scale + scale - 1, c);
              } else {
                rect(x + col * scale, y + row * scale, x + col * scale + scale - 1, y + row * scale + scale - 1, c);
              }
            }
      }
      if (vertical) y -= 6 * scale;
      else x += 6 * scale;
    }
  }
  int width() const { return w_; }
  int height() const { return h_; }
  const std::vector<uint8_t>& pixels() const { return pixels_; }

 private:
  int w_, h_;
  std::vector<uint8_t> pixels_;
};

uint32_t crc32(const uint8_t* data, size_t n, uint32_t crc = 0) {
  static const auto table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

void chunk(std::vector<uint8_t>& png, const char type[4], const std::vector<uint8_t>& data) {
  put_u32(png, static_cast<uint32_t>(data.size()));
  const size_t start = png.size();
  png.insert(png.end(), type, type + 4);
  png.insert(png.end(), data.begin(), data.end());
  put_u32(png, crc32(png.data() + start, png.size() - start));
}

// Deflate (RFC 1951) with the fixed Huffman code and one kind of match, a repeat of the previous byte
// (distance 1): a chart is mostly runs of one colour, so this alone shrinks it about 30 times.
class BitWriter {
 public:
  explicit BitWriter(std::vector<uint8_t>& out) : out_(out) {}
  void bits(uint32_t value, int count) {  // least significant bit first
    acc_ |= value << used_;
    used_ += count;
    while (used_ >= 8) {
      out_.push_back(static_cast<uint8_t>(acc_ & 0xFF));
      acc_ >>= 8;
      used_ -= 8;
    }
  }
  void code(uint32_t value, int length) {  // Huffman codes go most significant bit first
    uint32_t reversed = 0;
    for (int i = 0; i < length; ++i) reversed |= ((value >> i) & 1u) << (length - 1 - i);
    bits(reversed, length);
  }
  void flush() {
    if (used_ > 0) out_.push_back(static_cast<uint8_t>(acc_ & 0xFF));
    acc_ = 0;
    used_ = 0;
  }

 private:
  std::vector<uint8_t>& out_;
  uint32_t acc_ = 0;
  int used_ = 0;
};

void fixed_symbol(BitWriter& w, int symbol) {
  if (symbol < 144) w.code(0x30 + symbol, 8);
  else if (symbol < 256) w.code(0x190 + symbol - 144, 9);
  else if (symbol < 280) w.code(symbol - 256, 7);
  else w.code(0xC0 + symbol - 280, 8);
}

void deflate_runs(const std::vector<uint8_t>& raw, std::vector<uint8_t>& out) {
  static constexpr int kBase[] = {3,  4,  5,  6,  7,  8,  9,  10, 11,  13,  15,  17,  19,  23, 27,
                                  31, 35, 43, 51, 59, 67, 83, 99, 115, 131, 163, 195, 227, 258};
  static constexpr int kExtra[] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0};
  BitWriter w(out);
  w.bits(1, 1);  // the final block
  w.bits(1, 2);  // fixed Huffman codes
  size_t i = 0;
  while (i < raw.size()) {
    size_t run = 0;
    if (i > 0) {
      while (i + run < raw.size() && run < 258 && raw[i + run] == raw[i - 1]) ++run;
    }
    if (run < 3) {
      fixed_symbol(w, raw[i]);
      ++i;
      continue;
    }
    int k = 28;
    while (kBase[k] > static_cast<int>(run)) --k;
    fixed_symbol(w, 257 + k);
    w.bits(static_cast<uint32_t>(run - kBase[k]), kExtra[k]);
    w.code(0, 5);  // distance code 0: distance 1
    i += run;
  }
  fixed_symbol(w, 256);  // end of block
  w.flush();
}

std::vector<uint8_t> encode_png(const Canvas& canvas) {
  std::vector<uint8_t> raw;  // each row: filter byte 0, then palette indices
  raw.reserve(static_cast<size_t>(canvas.width() + 1) * canvas.height());
  for (int y = 0; y < canvas.height(); ++y) {
    raw.push_back(0);
    const auto row = canvas.pixels().begin() + static_cast<ptrdiff_t>(y) * canvas.width();
    raw.insert(raw.end(), row, row + canvas.width());
  }
  std::vector<uint8_t> z = {0x78, 0x01};
  deflate_runs(raw, z);
  uint32_t a = 1, b = 0;
  for (uint8_t v : raw) {
    a = (a + v) % 65521;
    b = (b + a) % 65521;
  }
  put_u32(z, (b << 16) | a);

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> header;
  put_u32(header, static_cast<uint32_t>(canvas.width()));
  put_u32(header, static_cast<uint32_t>(canvas.height()));
  header.insert(header.end(), {8, 3, 0, 0, 0});  // 8-bit, palette, deflate, no filter choice, no interlace
  chunk(png, "IHDR", header);
  std::vector<uint8_t> palette;
  for (const auto& rgb : kPalette) palette.insert(palette.end(), rgb.begin(), rgb.end());
  chunk(png, "PLTE", palette);
  chunk(png, "IDAT", z);
  chunk(png, "IEND", {});
  return png;
}

// A tick step of 1, 2 or 5 times a power of ten giving about `count` intervals.
double nice_step(double span, int count) {
  const double raw = span / count;
  const double power = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (raw <= m * power) return m * power;
  }
  return 10 * power;
}

std::string tick_label(double v, double step) {
  char buf[32];
  const int decimals = std::max(0, static_cast<int>(-std::floor(std::log10(step) + 1e-9)));
  if (std::fabs(v) >= 1e5 || (v != 0 && std::fabs(v) < 1e-3)) {
    std::snprintf(buf, sizeof buf, "%.2g", v);
  } else {
    std::snprintf(buf, sizeof buf, "%.*f", std::min(decimals, 6), v);
  }
  return buf;
}

}  // namespace

void write_line_chart_png(const std::string& path, const std::vector<Series>& series, const ChartOptions& options) {
  if (series.size() > kMaxSeries) throw Error(path + ": at most " + std::to_string(kMaxSeries) + " series per chart");
  double x0 = std::numeric_limits<double>::infinity(), x1 = -x0, y0 = x0, y1 = -x0;
  for (const Series& s : series) {
    if (s.x.size() != s.y.size()) throw Error(path + ": series '" + s.label + "' has " + std::to_string(s.x.size()) +
                                              " x values and " + std::to_string(s.y.size()) + " y values");
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      x0 = std::min(x0, s.x[i]), x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]), y1 = std::max(y1, s.y[i]);
    }
  }
  if (!std::isfinite(x0)) throw Error(path + ": nothing to plot (no finite points)");
  if (x1 == x0) x0 -= 1, x1 += 1;
  if (y1 == y0) y0 -= 1, y1 += 1;
  const double ystep = nice_step(y1 - y0, 6), xstep = nice_step(x1 - x0, 8);
  y0 = std::floor(y0 / ystep) * ystep, y1 = std::ceil(y1 / ystep) * ystep;
  x0 = std::floor(x0 / xstep) * xstep, x1 = std::ceil(x1 / xstep) * xstep;

  Canvas c(options.width, options.height);
  const int left = 90, right = options.width - 20, top = 45, bottom = options.height - 55;
  auto px = [&](double x) { return left + static_cast<int>(std::lround((x - x0) / (x1 - x0) * (right - left))); };
  auto py = [&](double y) { return bottom - static_cast<int>(std::lround((y - y0) / (y1 - y0) * (bottom - top))); };
  // Ticks by index: adding the step to a running value could stall on a span of a few ulps.
  const int yticks = static_cast<int>(std::lround((y1 - y0) / ystep)), xticks = static_cast<int>(std::lround((x1 - x0) / xstep));
  for (int i = 0; i <= std::min(yticks, 100); ++i) {
    const double y = y0 + i * ystep;
    c.line(left, py(y), right, py(y), kGrid);
    const std::string label = tick_label(y, ystep);
    c.text(left - 8 - Canvas::text_width(label, 1), py(y) - 3, label, kBlack);
  }
  for (int i = 0; i <= std::min(xticks, 100); ++i) {
    const double x = x0 + i * xstep;
    c.line(px(x), top, px(x), bottom, kGrid);
    const std::string label = tick_label(x, xstep);
    c.text(px(x) - Canvas::text_width(label, 1) / 2, bottom + 8, label, kBlack);
  }
  c.line(left, top, left, bottom, kBlack);
  c.line(left, bottom, right, bottom, kBlack);
  c.text((options.width - Canvas::text_width(options.title, 2)) / 2, 12, options.title, kBlack, 2);
  c.text((left + right - Canvas::text_width(options.x_label, 1)) / 2, bottom + 30, options.x_label, kBlack);
  c.text(20, (top + bottom + Canvas::text_width(options.y_label, 1)) / 2, options.y_label, kBlack, 1, /*vertical=*/true);

  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const uint8_t colour = static_cast<uint8_t>(kFirstSeries + k);
    bool have_previous = false;
    int prev_x = 0, prev_y = 0;
    for (size_t i = 0; i < s.x.size(); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        have_previous = false;
        continue;
      }
      const int x = px(s.x[i]), y = py(s.y[i]);
      if (s.markers) {
        c.rect(x - 3, y - 3, x + 3, y + 3, colour);
      } else if (have_previous) {
        c.line(prev_x, prev_y, x, y, colour, 2);
      }
      prev_x = x, prev_y = y, have_previous = true;
    }
    // Legend, top right.
    const int ly = top + 10 + static_cast<int>(k) * 16, lx = right - 10 - Canvas::text_width(s.label, 1) - 30;
    c.rect(lx, ly + 1, lx + 20, ly + 5, colour);
    c.text(lx + 26, ly, s.label, kBlack);
  }
  const std::vector<uint8_t> png = encode_png(c);
  util::write_file_atomically(path, [&](const util::ByteWriter& write) { write(png.data(), png.size()); });
}

}  // namespace tiedlora::chart
